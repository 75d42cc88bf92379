"""Benchmark: the generation stage as the pipeline runs it (generation + attention + perplexity, `hf`
backend) at batch 1, 4 and 16, against the official code's way on the same prompts (DESIGN 5).

    python bench/generate.py           tiny-llava on CPU, 1 and 4 images per prompt (a few minutes)
    python bench/generate.py --gpu-7b  and the LLaVA-1.5-7B shape (random bf16 weights), when CUDA is here

Ours: `workers.backends.hf.HFBackend` with attention recording: every candidate comes back with its
attention rows on the image tokens and its token log-probabilities (perplexity), recorded during
generation, no second pass. The official way: one prompt at a time, eager attention,
`generate(output_attentions=True, output_scores=True)`, then the middle layer's rows of each step read
for the image tokens and the perplexity taken from the scores (what MIA-DPO's released code does).
Both decode greedily the same prompts (sequence prompts of N 640x480 noise images, fitted as the family
fits them); so that both do the same work whatever the random weights say, the EOS is the image
placeholder, which generation suppresses: every answer is `max_new_tokens` long.
Time: CPU = the process's CPU time on 1 torch thread (on a shared machine wall time measures the
neighbours, CPU time the work), GPU = wall time; one untimed warm-up call per row. The last line
is the ratio of ours at batch 16 to the official way, 4 images, on the largest model measured.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformers.utils import logging as hf_logging  # noqa: E402

from core.settings import Settings  # noqa: E402
from workers.generate import GenerationConfig, PromptInput  # noqa: E402

SEVEN_B = "llava-1.5-7b-shape"
hf_logging.disable_progress_bar()  # no model-building progress bars between the rows


def make_prompts(handle: Any, count: int, images: int, seed: int = 0) -> list[PromptInput]:
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(count):
        raw = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(images)]
        fitted, offsets = handle.family.fit_images(handle.processor, raw)
        tags = "".join(f"Image {k + 1}: <image>\n" for k in range(images))
        prompts.append(PromptInput(uid=f"p{i}", prompt=f"{tags}Describe image {1 + i % images} in one sentence.",
                                   images=fitted, offsets=offsets))
    return prompts


def official_way(handle: Any, prompts: list[PromptInput], max_new_tokens: int, eos: int) -> list[tuple[float, float]]:
    """Per prompt: generate with eager attention and output_attentions, then (attention on the image tokens of
    the middle layer, averaged over heads and answer steps; perplexity from the scores)."""
    model, layer = handle.model, handle.default_layers[0]
    out = []
    for prompt in prompts:
        enc = handle.family.encode(handle.processor, [prompt])
        inputs = {k: v.to(device=handle.device, dtype=model.dtype) if v.is_floating_point() else v.to(handle.device)
                  for k, v in enc.inputs.items()}
        image_positions = torch.tensor(enc.image_positions(0), device=handle.device)
        with torch.inference_mode():
            gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 output_attentions=True, output_scores=True, return_dict_in_generate=True,
                                 eos_token_id=eos, pad_token_id=eos, suppress_tokens=[eos])
            # attentions[0] is the prefill (the prompt's rows); steps 1.. are the answer tokens' rows.
            rows = [step[layer][0, :, -1].mean(0)[image_positions].sum() for step in gen.attentions[1:]]
            attention = float(torch.stack(rows).mean()) if rows else float("nan")
            best = torch.stack([s[0].float().log_softmax(-1).max() for s in gen.scores])
            out.append((attention, float(torch.exp(-best.mean()))))
    return out


def load(model_name: str, device: str, root: Path) -> Any:
    from workers.models import load_model
    from workers.models.base import ModelHandle

    tiny = load_model("tiny-llava", Settings(data_dir=root), device=device)
    if model_name != SEVEN_B:
        return tiny
    from train import llava_7b_shape

    model = llava_7b_shape(tiny.processor, device)
    model.eval()
    return ModelHandle(name=SEVEN_B, model=model, processor=tiny.processor, family=tiny.family)


def bench(model_name: str, device: str, images: int, count: int, max_new_tokens: int) -> dict[str, float]:
    from workers.backends.hf import HFBackend

    cuda = device == "cuda"

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        handle = load(model_name, device, Path(tmp))
        eos = handle.family.image_token_id(handle.processor)  # suppressed: every answer is max_new_tokens long
        handle.model.generation_config.eos_token_id = eos
        prompts = make_prompts(handle, count, images)
        rates: dict[str, float] = {}
        backend = HFBackend(handle, record_attention=True)
        for batch in (1, 4, 16):
            config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch)
            backend.generate(prompts[:batch], config)  # warm-up
            t0 = clock()
            cands = backend.generate(prompts, config)
            rates[f"ours b{batch}"] = count / (clock() - t0)
            assert all(c[0].probe is not None and len(c[0].token_ids) <= max_new_tokens for c in cands)
        handle.model.set_attn_implementation("eager")
        official_way(handle, prompts[:1], max_new_tokens, eos)  # warm-up
        t0 = clock()
        official_way(handle, prompts, max_new_tokens, eos)
        rates["official"] = count / (clock() - t0)
        return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-7b", action="store_true", help="also the LLaVA-1.5-7B shape on CUDA (if present)")
    parser.add_argument("--gpu-only", action="store_true", help="only the 7B shape (bench/gpu.sh)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per row")
    parser.add_argument("--new-tokens", type=int, default=None, help="max_new_tokens (CPU 32, GPU 64)")
    args = parser.parse_args()
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}; CPU rows on 1 torch thread, CPU "
          f"time; CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    runs = [] if args.gpu_only else [("tiny-llava", "cpu", args.new_tokens or 32)]
    if args.gpu_7b or args.gpu_only:
        if torch.cuda.is_available():
            runs.append((SEVEN_B, "cuda", args.new_tokens or 64))
        else:
            print(f"--gpu-7b: skipped ({SEVEN_B} needs CUDA, none here)")
    header = (f"{'model':<20} {'images':>6} {'new tokens':>10} {'official':>9} {'ours b1':>8} {'ours b4':>8} "
              f"{'ours b16':>8} {'b1/off.':>8} {'b4/off.':>8} {'b16/off.':>8}")
    print()
    print(f"prompts/s ({args.prompts} prompts per row; generation + attention + perplexity)")
    print(header)
    print("-" * len(header))
    last = None
    for model_name, device, new_tokens in runs:
        if device == "cpu":
            torch.set_num_threads(1)
        for images in (1, 4):
            r = bench(model_name, device, images, args.prompts, new_tokens)
            off = r["official"]
            print(f"{model_name:<20} {images:>6} {new_tokens:>10} {off:>9.2f} {r['ours b1']:>8.2f} {r['ours b4']:>8.2f} "
                  f"{r['ours b16']:>8.2f} {r['ours b1'] / off:>7.1f}x {r['ours b4'] / off:>7.1f}x "
                  f"{r['ours b16'] / off:>7.1f}x", flush=True)
            last = r
    print()
    print("official = batch 1, eager attention, generate(output_attentions=True), attention and perplexity read")
    print("from its outputs; ours = the hf backend recording attention and log-probs during generation.")
    print()
    if last is None:
        return
    print(f"ours/official prompts/s ratio (batch 16, 4 images): {last['ours b16'] / last['official']:.1f}")


if __name__ == "__main__":
    main()
