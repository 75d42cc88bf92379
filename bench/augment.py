"""Benchmark: rendering augmented samples from JPEG sources, per format (run: python bench/augment.py).

Builds ~40 synthetic photo-like JPEGs (q90) in a temporary artifact store, then for each format renders
as many recipes as fit in the time budget, single process, and splits the time into decode,
resize + compose and PNG encode (what `miadpo augment` does when it writes a sample). A JPEG q95 encode
is timed too, for comparison, outside the totals. Finally two processes (one per core) render grids
together. Target: >= 100 grid collages/s per core from 640x480 sources.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.dataset import Sample  # noqa: E402
from core.store import ArtifactStore  # noqa: E402
from workers.augment import FORMATS, AugmentMix, make_recipes  # noqa: E402
from workers.render import encode_png, render_recipe, store_loader  # noqa: E402

NUM_SOURCES = 40
SIZES = [(640, 480)] * 6 + [(640, 427), (480, 640)]  # COCO-like: mostly 640x480


def photo_like(i: int, size: tuple[int, int]) -> bytes:
    """A JPEG (q90) with smooth gradients, shapes and sensor-like noise: compresses like a photo."""
    rng = np.random.default_rng(i)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(x / rng.uniform(40, 200) + rng.uniform(0, 6)),
            128 + 100 * np.cos(y / rng.uniform(40, 200) + rng.uniform(0, 6)),
            128 + 80 * np.sin((x + y) / rng.uniform(60, 300)),
        ],
        axis=-1,
    )
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        box = (x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def build_store(root: Path, scale: int = 1) -> list[Sample]:
    store = ArtifactStore(root)
    samples = []
    for i in range(NUM_SOURCES):
        w, h = SIZES[i % len(SIZES)]
        w, h = w * scale, h * scale
        ref = store.put_image_bytes(photo_like(i, (w, h)))
        samples.append(Sample(f"s{i}", ref, w, h, "<image>\nWhat is in the picture?", "Shapes."))
    return samples


def run(root: Path, samples: list[Sample], fmt: str, seconds: float, jpeg: bool = True) -> dict[str, float]:
    """Render recipes of one format for about `seconds`; return counts and time per phase."""
    load = store_loader(ArtifactStore(root))
    mix = AugmentMix().only([fmt])
    timings: dict[str, float] = {"decode": 0.0, "resize": 0.0, "compose": 0.0, "png": 0.0, "jpeg": 0.0}
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for recipe in make_recipes(samples, 5, seed=1, mix=mix, start=n):
            images = render_recipe(recipe, load, timings=timings)
            t0 = time.perf_counter()
            for im in images:
                encode_png(im)
            t1 = time.perf_counter()
            if jpeg:
                for im in images:
                    im.save(io.BytesIO(), "JPEG", quality=95)
            timings["png"] += t1 - t0
            timings["jpeg"] += time.perf_counter() - t1
            n += 1
    timings["n"] = n
    return timings


def _worker(args: tuple[str, list[Sample], float]) -> dict[str, float]:
    root, samples, seconds = args
    torch.set_num_threads(1)
    return run(Path(root), samples, "grid", seconds, jpeg=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="time budget per row")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per process: the table is per core

    with tempfile.TemporaryDirectory(prefix="bench-augment-") as tmp:
        t0 = time.perf_counter()
        samples = build_store(Path(tmp) / "store")
        large = build_store(Path(tmp) / "store-2x", scale=2)
        print(
            f"{NUM_SOURCES} synthetic JPEG sources (q90, mostly 640x480) + {NUM_SOURCES} at 2x size, "
            f"built in {time.perf_counter() - t0:.1f} s; {os.cpu_count()} cpus, Pillow {Image.__version__}"
        )
        print()
        header = (
            f"{'format':<18} {'n':>5} {'render/s':>9} {'+png/s':>8} {'per core':>9} "
            f"{'decode':>7} {'resize+comp':>12} {'png':>6} {'png ms':>7} {'jpeg95 ms':>10}"
        )
        print(header)
        print("-" * len(header))
        rows = [(fmt, Path(tmp) / "store", samples, args.seconds) for fmt in FORMATS]
        rows.append(("grid (1280x960)", Path(tmp) / "store-2x", large, args.seconds * 0.6))
        for name, root, srcs, seconds in rows:
            t = run(root, srcs, name.split()[0], seconds)
            render = t["decode"] + t["resize"] + t["compose"]
            total = render + t["png"]
            n = t["n"]
            print(
                f"{name:<18} {n:>5.0f} {n / render:>9.1f} {n / total:>8.1f} {n / total:>9.1f} "
                f"{t['decode'] / total:>7.0%} {(t['resize'] + t['compose']) / total:>12.0%} "
                f"{t['png'] / total:>6.0%} {1000 * t['png'] / n:>7.2f} {1000 * t['jpeg'] / n:>10.2f}"
            )
        print()
        procs = 2
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            results = pool.map(_worker, [(str(Path(tmp) / "store"), samples, args.seconds)] * procs)
        render_rate = sum(r["n"] / (r["decode"] + r["resize"] + r["compose"]) for r in results)
        total_rate = sum(r["n"] / (r["decode"] + r["resize"] + r["compose"] + r["png"]) for r in results)
        print(
            f"grid, {procs} processes: {render_rate:.1f} renders/s total, {total_rate:.1f} render+png/s total "
            f"({total_rate / procs:.1f} per process)"
        )
        print("n: samples rendered; per core = render+png/s of one process; shares are of render+png time;")
        print(
            "a sequence sample is N separate images (each PNG-encoded); jpeg95 ms is extra, not in the totals."
        )


if __name__ == "__main__":
    main()
