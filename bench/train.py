"""Benchmark: one DPO + LoRA pair step (policy + reference passes, backward, optimizer step), TRL's
plain step against the speed-ups of trainer.fast, alone and together.

    python bench/train.py            tiny-llava on CPU: 1 image plain and fast; 4 images plain, reference
                                     log-probs once, shared prompt once, both (about 3 minutes)
    python bench/train.py --gpu-7b   and a LLaVA-1.5-7B-shaped model (random weights, bf16, CUDA) with
                                     LoRA r64 on the LM linears: 1 image plain and fast, 4 images every
                                     variant, and 4 images plain and fast with gradient checkpointing;
                                     skipped when there is no GPU (--gpu-only: these rows alone)

The last line compares, on tiny-llava with 4 images (or the 7B shape with 4 images when it ran):
`fast/plain step time ratio: X  fast/plain peak memory ratio: Y` (fast = both speed-ups).

Every row runs in a fresh process (so its peak memory is its own) through the trainer's own config
mapping (trainer.config.build_configs) and trl.DPOTrainer, on an export written with ShardWriter
(sequence prompts of N noise images, 640x480 like COCO: the image processing counts too). A pair step
is one optimizer step at batch 1; the first steps are warm-up and not counted. The reference log-probs,
when computed once, are computed before training (column `ref once`: seconds per pair, paid once per
training, not per epoch) and are not in s/step.
Columns: tokens = prompt + chosen answer (what one of the four forward passes sees); pairs/s = from
step end to step end (data loading and collation included); s/step = step begin to step end (compute
only); peak = CPU: the process's peak RSS (getrusage ru_maxrss of the fresh process; tracemalloc does not
see torch's allocations) and, in brackets, its rise over the RSS before the trainer was built (psutil; the
memory ratio compares these rises); GPU: torch.cuda.max_memory_allocated from the trainer's construction
on (weights included).
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
VARIANTS = ("plain", "ref once", "shared prompt once", "both")
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
        self.cpu: list[float] = []
        self.interval: list[float] = []
        self._begin = self._end = self._cpu_begin = 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._begin = self._now()
        self._cpu_begin = time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        end = self._now()
        if state.global_step > self.skip:
            self.compute.append(end - self._begin)
            self.cpu.append(time.process_time() - self._cpu_begin)
            self.interval.append(end - self._end)
        self._end = end


def measure(case: dict[str, Any]) -> dict[str, Any]:
    """One row, in this (fresh) process."""
    from transformers import PrinterCallback

    from trainer.fast import FastDPOTrainer
    from workers.models import load_model

    device, images, steps, warmup = case["device"], case["images"], case["steps"], case["warmup"]
    if device == "cpu":
        torch.set_num_threads(1)  # CPU time per step = the work, with no thread spinning in it
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
            max_steps=warmup + steps, gradient_checkpointing=case["gc"], fast_path=case["fast"],
            precompute_ref_logps=case["ref_once"],
        )
        args, lora = build_configs(hp, root / "out", device=device, checkpoint_every=None)
        timer = StepTimer(warmup, device == "cuda")
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss()
        t0 = time.perf_counter() if device == "cuda" else time.process_time()
        trainer = FastDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                                 peft_config=lora, callbacks=[timer], fast_path=case["fast"],
                                 precompute_ref_logps=case["ref_once"])
        if device == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter() if device == "cuda" else time.process_time()
        ref_once = (t1 - t0) / len(dataset) if case["ref_once"] else 0.0
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    compute = float(np.median(timer.compute))
    return {
        **case, "tokens": int(tokens), "s_per_step": compute, "cpu_s_per_step": float(np.median(timer.cpu)),
        "pairs_per_s": 1.0 / float(np.mean(timer.interval)),
        "peak_bytes": int(peak), "rise_bytes": int(peak - base), "steps_timed": len(timer.compute),
        "ref_once_s": ref_once,
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
    parser.add_argument("--gpu-only", action="store_true", help="only the 7B-shaped rows (bench/gpu.sh)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per row (after 2 warm-up steps)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one case (JSON) and print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return

    import transformers
    import trl

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"CPU rows on 1 torch thread; CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    def case(model: str, images: int, variant: str, gc: bool = False) -> dict[str, Any]:
        gpu = model == SEVEN_B
        return {"model": model, "device": "cuda" if gpu else "cpu", "images": images, "gc": gc,
                "lora_r": 64 if gpu else 8, "steps": args.steps, "warmup": 2, "variant": variant,
                "fast": variant in ("shared prompt once", "both"), "ref_once": variant in ("ref once", "both")}

    cases = []
    if not args.gpu_only:
        cases += [case("tiny-llava", 1, "plain"), case("tiny-llava", 1, "both")]
        cases += [case("tiny-llava", 4, v) for v in VARIANTS]
    if args.gpu_7b or args.gpu_only:
        if torch.cuda.is_available():
            cases += [case(SEVEN_B, 1, v) for v in ("plain", "both")]
            cases += [case(SEVEN_B, 4, v) for v in VARIANTS]
            cases += [case(SEVEN_B, 4, v, gc=True) for v in ("plain", "both")]
        else:
            print(f"--gpu-7b: skipped ({SEVEN_B} needs CUDA, none here)")
    header = (f"{'model':<20} {'device':<6} {'LoRA r':>6} {'grad ckpt':>9} {'images':>6} {'tokens':>6} "
              f"{'step':<18} {'pairs/s':>8} {'s/step':>8} {'CPU s/step':>10} {'ref once':>9} {'peak memory':>24}")
    print()
    print(header)
    print("-" * len(header))
    results = []
    for c in cases:
        t0 = time.perf_counter()
        r = run_case(c)
        results.append(r)
        rise = f" (+{_gib(r['rise_bytes'])})" if r["device"] == "cpu" else ""
        ref = f"{r['ref_once_s']:.3f}" if r["ref_once"] else "-"
        print(f"{r['model']:<20} {r['device']:<6} {r['lora_r']:>6} {'yes' if r['gc'] else 'no':>9} {r['images']:>6} "
              f"{r['tokens']:>6} {r['variant']:<18} {r['pairs_per_s']:>8.2f} {r['s_per_step']:>8.3f} "
              f"{r['cpu_s_per_step'] if r['device'] == 'cpu' else float('nan'):>10.3f} {ref:>9} "
              f"{_gib(r['peak_bytes']) + rise:>24}   [{time.perf_counter() - t0:.0f} s]", flush=True)
    print()
    print("step: plain = TRL's (chosen and rejected sequences, policy + adapter-disabled reference forwards);")
    print("ref once = reference log-probs computed before training (`ref once`: s per pair, once per training);")
    print("shared prompt once = one packed forward per pair; both = the default. s/step: forward, backward,")
    print("AdamW step, median wall time; CPU s/step: the process's CPU seconds (1 torch thread on CPU: on a")
    print("shared machine wall time measures the neighbours, CPU time the work; the CPU ratio below uses it);")
    print("pairs/s also pays for image decoding and processing; ref once: CPU (GPU: wall) s per pair; peak: CPU")
    print("RSS (rise over the RSS before the trainer), GPU max_memory_allocated. Only GPU times count in")
    print("absolute terms (DESIGN 5).")
    print()
    if not results:
        return
    model = SEVEN_B if any(r["model"] == SEVEN_B for r in results) else "tiny-llava"

    def pick(variant: str) -> dict[str, Any]:
        return next(r for r in results if r["model"] == model and r["images"] == 4 and not r["gc"]
                    and r["variant"] == variant)

    plain, fast = pick("plain"), pick("both")
    memory = "peak_bytes" if model == SEVEN_B else "rise_bytes"
    timing = "s_per_step" if model == SEVEN_B else "cpu_s_per_step"
    print(f"fast/plain step time ratio: {fast[timing] / plain[timing]:.2f}  "
          f"fast/plain peak memory ratio: {fast[memory] / plain[memory]:.2f}")


if __name__ == "__main__":
    main()
