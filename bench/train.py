"""Benchmark: one DPO + LoRA pair step (policy + reference passes, backward, optimizer step).

    python bench/train.py            tiny-llava on CPU, 1 and 4 images per prompt (< 2 minutes)
    python bench/train.py --gpu-7b   and a LLaVA-1.5-7B-shaped model (random weights, bf16, CUDA) with
                                     LoRA r64 on the LM linears, 1 and 4 images, with and without
                                     gradient checkpointing; skipped when there is no GPU

Every row runs in a fresh process (so its peak memory is its own) through the trainer's own config
mapping (trainer.config.build_configs) and trl.DPOTrainer, on an export written with ShardWriter
(sequence prompts of N noise images, 640x480 like COCO: the image processing counts too). A pair step
is one optimizer step at batch 1; the first steps are warm-up and not counted.
Columns: tokens = prompt + chosen answer (what one of the four forward passes sees); pairs/s = from
step end to step end (data loading and collation included); s/step = step begin to step end (compute
only); peak = CPU: the process's peak RSS (getrusage ru_maxrss of the fresh process; tracemalloc does not
see torch's allocations) and, in brackets, its rise over the RSS before training (psutil); GPU:
torch.cuda.max_memory_allocated during training.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.settings import Settings  # noqa: E402
from trainer.config import TrainHyperparameters, build_configs  # noqa: E402
from trainer.data import load_pairs  # noqa: E402
from workers.export import ExportPair, ShardWriter  # noqa: E402

SEVEN_B = "llava-1.5-7b-shape"
# LLaVA-1.5-7B: Vicuna-7B (LLaMA-2 shape, 32064-token vocabulary) and CLIP ViT-L/14 at 336 px.
TEXT_7B: dict[str, Any] = {"vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
VISION_7B: dict[str, Any] = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
             "image_size": 336, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"}
ANSWERS = [
    ("The first image shows a red car parked next to a tree on a quiet street.",
     "The first image shows a blue bus driving past a tall building at night."),
    ("A dog is sitting on the grass and looking at the camera.",
     "Two cats are sleeping on a sofa next to a window."),
]


def write_export(out_dir: Path, num_pairs: int, images_per_prompt: int, seed: int = 0) -> Path:
    """Sequence prompts of `images_per_prompt` 640x480 noise images; answers of real-caption length."""
    rng = np.random.default_rng(seed)
    writer = ShardWriter(out_dir)
    for i in range(num_pairs):
        images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
                  for _ in range(images_per_prompt)]
        tags = "".join(f"Image {k + 1}: <image>\n" for k in range(images_per_prompt))
        chosen, rejected = ANSWERS[i % len(ANSWERS)]
        writer.add(ExportPair(
            uid=f"p{i}", source_id=f"s{i}", format="sequence", target_index=0,
            prompt=f"{tags}Describe image 1 in one sentence.", images=images, chosen=chosen, rejected=rejected,
            attention_ratio=0.5, perplexity=3.0, length_ratio=1.0, edit_distance=0.5,
        ))
    writer.close()
    return out_dir


def llava_7b_shape(processor: Any, device: str) -> Any:
    """LLaVA-1.5-7B's architecture (Vicuna-7B + CLIP ViT-L/14-336 + 2-layer MLP projector), random bf16 weights.

    The tiny model's processor has the real image geometry (336 px, 14 px patches, 576 tokens per image);
    its byte-level tokenizer's ids all fall inside the 32064-token vocabulary.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION_7B),
        text_config=LlamaConfig(
            **TEXT_7B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


class StepTimer(TrainerCallback):
    """Times each optimizer step (synchronising CUDA), skipping the first `skip`."""

    def __init__(self, skip: int, cuda: bool) -> None:
        self.skip, self.cuda = skip, cuda
        self.compute: list[float] = []
        self.interval: list[float] = []
        self._begin = self._end = 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._begin = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        end = self._now()
        if state.global_step > self.skip:
            self.compute.append(end - self._begin)
            self.interval.append(end - self._end)
        self._end = end


def measure(case: dict[str, Any]) -> dict[str, Any]:
    """One row, in this (fresh) process."""
    from transformers import PrinterCallback
    from trl import DPOTrainer

    from workers.models import load_model

    device, images, steps, warmup = case["device"], case["images"], case["steps"], case["warmup"]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        export = write_export(root / "export", warmup + steps, images)
        tiny = load_model("tiny-llava", Settings(data_dir=root / "data"), device=device)
        processor = tiny.processor
        model: Any
        if case["model"] == SEVEN_B:
            del tiny
            model = llava_7b_shape(processor, device)
        else:
            model = tiny.model
        dataset = load_pairs(export, cache_dir=root / "cache")
        row = dataset[0]
        text = processor.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
        tokens = processor(text=[text], images=row["images"], return_tensors="pt")["input_ids"].shape[1]
        hp = TrainHyperparameters(
            lora_r=case["lora_r"], lora_alpha=2 * case["lora_r"], learning_rate=1e-5, warmup_ratio=0.0,
            max_steps=warmup + steps, gradient_checkpointing=case["gc"],
        )
        args, lora = build_configs(hp, root / "out", device=device, checkpoint_every=None)
        timer = StepTimer(warmup, device == "cuda")
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                             peft_config=lora, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss()
        trainer.train()
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    compute = float(np.mean(timer.compute))
    return {
        **case, "tokens": int(tokens), "s_per_step": compute, "pairs_per_s": 1.0 / float(np.mean(timer.interval)),
        "peak_bytes": int(peak), "rise_bytes": int(peak - base), "steps_timed": len(timer.compute),
    }


def _rss() -> int:
    try:
        import psutil
    except ImportError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return int(psutil.Process().memory_info().rss)


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """`measure` in a fresh interpreter; its last stdout line is the JSON result."""
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(case)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-7b", action="store_true", help="also time a LLaVA-1.5-7B-shaped model on CUDA")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per row (after 2 warm-up steps)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one case (JSON) and print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return

    import transformers
    import trl

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"{torch.get_num_threads()} CPU threads; CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    cases = [
        {"model": "tiny-llava", "device": "cpu", "images": n, "gc": False, "lora_r": 8, "steps": args.steps, "warmup": 2}
        for n in (1, 4)
    ]
    if args.gpu_7b:
        if torch.cuda.is_available():
            cases += [
                {"model": SEVEN_B, "device": "cuda", "images": n, "gc": gc, "lora_r": 64, "steps": args.steps, "warmup": 2}
                for n, gc in ((1, False), (4, False), (1, True), (4, True))
            ]
        else:
            print(f"--gpu-7b: skipped ({SEVEN_B} needs CUDA, none here)")
    header = (f"{'model':<20} {'device':<6} {'LoRA r':>6} {'grad ckpt':>9} {'images':>6} {'tokens':>6} "
              f"{'pairs/s':>8} {'s/step':>8} {'peak memory':>24}")
    print()
    print(header)
    print("-" * len(header))
    for case in cases:
        t0 = time.perf_counter()
        r = run_case(case)
        rise = f" (+{_gib(r['rise_bytes'])})" if r["device"] == "cpu" else ""
        print(f"{r['model']:<20} {r['device']:<6} {r['lora_r']:>6} {'yes' if r['gc'] else 'no':>9} {r['images']:>6} "
              f"{r['tokens']:>6} {r['pairs_per_s']:>8.2f} {r['s_per_step']:>8.3f} {_gib(r['peak_bytes']) + rise:>24}"
              f"   [{time.perf_counter() - t0:.0f} s]", flush=True)
    print()
    print("s/step: one pair (chosen + rejected, policy + adapter-disabled reference), backward, AdamW step;")
    print("pairs/s also pays for image decoding and processing; peak: CPU RSS (rise over the RSS before")
    print("training), GPU max_memory_allocated. Only GPU times count in absolute terms (DESIGN 5).")


if __name__ == "__main__":
    main()
