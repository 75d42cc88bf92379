"""Benchmark: the attention pass (workers.attention.probe) against a plain sdpa forward and the official
code's way (eager attention, `output_attentions=True`), on the same inputs (DESIGN 5).

    python bench/attention.py          tiny-llava on CPU, 1, 2 and 4 images per prompt (a few minutes)
    python bench/attention.py --gpu-7b and the LLaVA-1.5-7B shape (random bf16 weights, CUDA), when CUDA is here

One (prompt, candidate) pair per forward: a sequence prompt of N 640x480 noise images (padded to a square
as the family does) and a 16-token answer; the middle layer's attention is read, as the pipeline does.
Columns, per method: time of the model forward (median of the timed repeats after a warm-up; the
processor's time is reported apart, as `processor`, and as its share of processor + probe), and peak
memory. Each (case, method) runs in a fresh process so that its peak is its own: CPU = rise of the peak RSS
(getrusage) over the RSS before the first forward; GPU = max_memory_allocated minus the memory allocated
before it. On CPU every forward runs on 1 torch thread and the time is the process's CPU time (on a
shared machine the wall time measures the neighbours, the CPU time the work); on GPU it is wall time.
The last line is the 4-image row of the largest model measured:
`probe/sdpa time ratio: X  probe/sdpa memory ratio: Y`.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformers.utils import logging as hf_logging  # noqa: E402

from core.settings import Settings  # noqa: E402
from workers.generate import PromptInput  # noqa: E402

SEVEN_B = "llava-1.5-7b-shape"
hf_logging.disable_progress_bar()  # no model-building progress bars between the rows
METHODS = ("sdpa", "probe", "eager+attentions")
ANSWER = "The first image shows a red car parked next to a tree."


def make_prompt(handle: Any, images: int, seed: int = 0) -> PromptInput:
    """A sequence prompt of `images` 640x480 noise images, fitted as the family fits them."""
    rng = np.random.default_rng(seed)
    raw = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(images)]
    fitted, offsets = handle.family.fit_images(handle.processor, raw)
    tags = "".join(f"Image {k + 1}: <image>\n" for k in range(images))
    return PromptInput(uid="p0", prompt=f"{tags}Describe image 1 in one sentence.", images=fitted, offsets=offsets)


def _rss() -> int:
    try:
        import psutil
    except ImportError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return int(psutil.Process().memory_info().rss)


def load(case: dict[str, Any], root: Path) -> Any:
    """The model handle of a case (eager attention for the official way)."""
    from workers.models import load_model
    from workers.models.base import ModelHandle

    device = case["device"]
    attn = "eager" if case["method"] == "eager+attentions" else "sdpa"
    tiny = load_model("tiny-llava", Settings(data_dir=root), device=device, attn_implementation=attn)
    if case["model"] != SEVEN_B:
        return tiny
    from train import llava_7b_shape

    model = llava_7b_shape(tiny.processor, device)
    if attn == "eager":
        model.set_attn_implementation("eager")
    model.eval()
    return ModelHandle(name=SEVEN_B, model=model, processor=tiny.processor, family=tiny.family)


def measure(case: dict[str, Any]) -> dict[str, Any]:
    """One (case, method) in this fresh process."""
    from workers import attention

    cuda = case["device"] == "cuda"
    if not cuda:
        torch.set_num_threads(1)

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    with tempfile.TemporaryDirectory(prefix="bench-attention-") as tmp:
        handle = load(case, Path(tmp))
        prompt = make_prompt(handle, case["images"])
        answer = handle.processor.tokenizer(ANSWER, add_special_tokens=False)["input_ids"][:16]
        layers = handle.default_layers

        # The processor, timed apart (what the probe's encode does).
        encode_times = []
        for _ in range(case["repeats"] + 1):
            t0 = clock()
            enc = handle.family.encode(handle.processor, [prompt], [answer])
            encode_times.append(clock() - t0)
        inputs = attention._model_inputs(handle, enc)
        tokens = enc.seq_len
        n_rows = len(answer) + 1

        if case["method"] == "probe":
            family = handle.family

            def run() -> None:
                # The probe's own processor call answered with the inputs encoded above: the processor is
                # timed apart, and neither its time nor its memory is the probe's.
                family.encode = lambda *args, **kwargs: enc  # type: ignore[method-assign]
                try:
                    attention.probe(handle, [prompt], [answer], layers=layers, batch_size=1)
                finally:
                    del family.encode
        elif case["method"] == "sdpa":
            def run() -> None:
                with torch.inference_mode():
                    handle.model(**inputs, use_cache=False, logits_to_keep=n_rows)
        else:  # the official code's way: every layer's full attention matrices
            def run() -> None:
                with torch.inference_mode():
                    out = handle.model(**inputs, use_cache=False, logits_to_keep=n_rows, output_attentions=True)
                    rows = out.attentions[layers[0]][0, :, -n_rows:].mean(0)  # what it reads of them
                    del out, rows

        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss()
        times = []
        for i in range(case["repeats"] + 1):
            t0 = clock()
            run()
            elapsed = clock() - t0
            if i:
                times.append(elapsed)
        peak = (torch.cuda.max_memory_allocated() if cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    return {**case, "tokens": int(tokens), "seconds": float(np.median(times)),
            "processor_s": float(np.median(encode_times[1:])), "peak_bytes": int(max(peak, 0))}


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(case)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-7b", action="store_true", help="also the LLaVA-1.5-7B shape on CUDA (if present)")
    parser.add_argument("--gpu-only", action="store_true", help="only the 7B shape (bench/gpu.sh)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per method, after one warm-up")
    parser.add_argument("--images", default="1,2,4", help="images per prompt, comma separated")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return

    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}; CPU rows on 1 torch thread, CPU "
          f"time; CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    counts = [int(x) for x in args.images.split(",")]
    models = [] if args.gpu_only else [("tiny-llava", "cpu")]
    if args.gpu_7b or args.gpu_only:
        if torch.cuda.is_available():
            models.append((SEVEN_B, "cuda"))
        else:
            print(f"--gpu-7b: skipped ({SEVEN_B} needs CUDA, none here)")
    header = (f"{'model':<20} {'images':>6} {'tokens':>6} {'processor':>10} {'sdpa':>9} {'probe':>9} "
              f"{'eager+attn':>10} {'probe/sdpa':>10} {'eager/sdpa':>10} {'proc. share':>11} "
              f"{'sdpa peak':>10} {'probe peak':>10} {'eager peak':>10}")
    print()
    print(header)
    print("-" * len(header))
    last = None
    for model, device in models:
        for n in counts:
            rows = {m: run_case({"model": model, "device": device, "images": n, "method": m,
                                 "repeats": args.repeats}) for m in METHODS}
            sdpa, probe, eager = rows["sdpa"], rows["probe"], rows["eager+attentions"]
            proc = probe["processor_s"]
            print(f"{model:<20} {n:>6} {sdpa['tokens']:>6} {proc * 1e3:>8.1f}ms {sdpa['seconds'] * 1e3:>7.1f}ms "
                  f"{probe['seconds'] * 1e3:>7.1f}ms {eager['seconds'] * 1e3:>8.1f}ms "
                  f"{probe['seconds'] / sdpa['seconds']:>9.2f}x {eager['seconds'] / sdpa['seconds']:>9.2f}x "
                  f"{proc / (proc + probe['seconds']):>10.0%} {_mib(sdpa['peak_bytes']):>10} "
                  f"{_mib(probe['peak_bytes']):>10} {_mib(eager['peak_bytes']):>10}", flush=True)
            last = (sdpa, probe)
    print()
    print("times: the model forward alone (probe: forward + recording + reading the rows out; its processor call")
    print("is the `processor` column, in neither its time nor its memory; proc. share = processor / (processor +")
    print("probe)); peak: memory the forward adds (CPU:")
    print("peak RSS rise, coarse at tiny sizes; GPU: max_memory_allocated rise). Only GPU times are absolute.")
    print()
    if last is None:
        return
    sdpa, probe = last
    print(f"probe/sdpa time ratio: {probe['seconds'] / sdpa['seconds']:.2f}  "
          f"probe/sdpa memory ratio: {probe['peak_bytes'] / max(sdpa['peak_bytes'], 1):.2f}")


if __name__ == "__main__":
    main()
