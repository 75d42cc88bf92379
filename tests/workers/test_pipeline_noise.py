"""Input perturbation (DESIGN 2.3): generation and the attention pass see noise on the target (or the whole
image), the export does not; the official recipe, checked by hand."""

from __future__ import annotations

import glob
from dataclasses import replace

import numpy as np
import pytest
from datasets import load_dataset
from PIL import Image

from core.dataset import read_samples
from core.store import ArtifactStore
from workers.augment import IMAGE_COUNTS, Recipe
from workers.backends.hf import HFBackend
from workers.generate import GenerationConfig
from workers.ingest import IngestLimits, ingest
from workers.pipeline import (
    NoiseSpec,
    PipelineConfig,
    merge_and_export,
    model_fit,
    process_shard,
    write_records,
)
from workers.postselect import PostSelectionConfig
from workers.render import encode_png, image_boxes, perturb_target, render_recipe, store_loader
from workers.sample_data import write_sample_data
from workers.select import SelectionConfig

EVERY_CANDIDATE = SelectionConfig(thresholds={f: {n: 1.0 for n in counts} for f, counts in IMAGE_COUNTS.items()})
NO_FILTER = PostSelectionConfig(perplexity=False, length_ratio=False, edit_distance=False)


def _judged(rec: dict) -> list[tuple]:
    return [(c["text"], c["ratio"], c["perplexity"]) for c in rec["candidates"]]


def test_generation_sees_noise_and_the_export_stays_clean(tmp_path, tiny_llava):
    store = ArtifactStore(tmp_path / "store")
    write_sample_data(tmp_path / "sd", num_samples=12, seed=2)
    ingest(tmp_path / "sd", store, "ds", limits=IngestLimits(10**9, 1000, 200.0, 10**8, 512))
    samples = read_samples(store, "ds")
    load = store_loader(store)
    # Every answer that differs from the ground truth becomes a pair: the export has rows of each format.
    clean_config = PipelineConfig(
        num=8, seed=1, generation=GenerationConfig(max_new_tokens=6, batch_size=4),
        selection=EVERY_CANDIDATE, post_selection=NO_FILTER,
    )  # fmt: skip
    noisy_config = replace(clean_config, noise={"grid": NoiseSpec(80.0), "pic_in_pic": NoiseSpec(80.0, "image")})
    backend = HFBackend(tiny_llava)  # attention recorded during generation: the ratios saw the same pixels
    clean = process_shard(samples, clean_config, 0, 8, handle=tiny_llava, backend=backend, load=load)
    noisy = process_shard(samples, noisy_config, 0, 8, handle=tiny_llava, backend=backend, load=load)

    formats = {r["recipe"]["format"] for r in clean}
    assert formats == {"sequence", "grid", "pic_in_pic"}
    for a, b in zip(clean, noisy, strict=True):
        assert a["recipe"] == b["recipe"]  # noise changes what the model sees, not what is asked
        if a["recipe"]["format"] in noisy_config.noise:
            assert _judged(a) != _judged(b), a["uid"]
        else:  # sequence gets no noise here
            assert _judged(a) == _judged(b), a["uid"]
    # The same config gives the same records: the noise is seeded.
    assert process_shard(samples, noisy_config, 0, 8, handle=tiny_llava, backend=backend, load=load) == noisy

    write_records(tmp_path / "shards" / "00000.jsonl", noisy)
    fit = model_fit(tiny_llava)
    result = merge_and_export([tmp_path / "shards" / "00000.jsonl"], noisy_config, tmp_path / "export", load, fit)
    ds = load_dataset("parquet", data_files=sorted(glob.glob(str(tmp_path / "export" / "data" / "*.parquet"))), split="train")
    assert len(ds) == result.num_pairs > 0
    by_uid = {r["uid"]: Recipe.from_dict(r["recipe"]) for r in noisy}
    exported = set()
    for row in ds:
        recipe = by_uid[row["uid"]]
        images = [im.convert("RGB") for im in row["images"]]  # decoded from the stored PNG
        # Clean, and fitted as the model saw them (tiny-llava: padded to squares).
        expected, _ = fit(render_recipe(recipe, load))
        assert [encode_png(im) for im in images] == [encode_png(im) for im in expected]
        assert all(im.width == im.height for im in images)
        exported.add(recipe.format)
    assert exported & {"grid", "pic_in_pic"}  # a noised format was exported, and exported clean
    assert noisy_config.to_dict()["noise"]["pic_in_pic"] == {"std": 80.0, "region": "image"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"std": -1.0}, "noise std must be in"),
        ({"std": 300.0}, "noise std must be in"),
        ({"std": float("nan")}, "noise std must be in"),
        ({"std": 1.0, "region": "cell"}, "noise region must be one of"),
    ],
)
def test_noise_config_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseSpec(**kwargs)
    with pytest.raises(ValueError, match="formats must be among"):
        PipelineConfig(noise={"collage": NoiseSpec(1.0)})


def _recipe(fmt: str, n: int) -> Recipe:
    from workers.augment import SourceImage, build_prompt

    images = tuple(SourceImage(f"{i:064x}", 384 if i % 2 else 300, 288, f"s{i}") for i in range(n))
    target = 1 if fmt == "pic_in_pic" else n - 1
    phrase = "For the image in the center" if fmt == "pic_in_pic" else None
    return Recipe("0-0000001", 1, 0, fmt, "s", "What?", "A.", images, target, build_prompt(fmt, n, target, "What?", phrase), phrase)


def test_official_noise_recipe_by_hand():
    """grid: std 225 on the target's cell only; pic-in-pic: std 49 over the whole image; seeded."""
    official = PipelineConfig(preset="official_code", noise={"grid": NoiseSpec(225.0, "target"), "pic_in_pic": NoiseSpec(49.0, "image")})
    grid = _recipe("grid", 4)
    canvas = Image.new("RGB", (1016, 1152), (128, 128, 128))
    spec = official.noise["grid"]
    noisy = np.asarray(perturb_target([canvas], grid, spec.std, seed=0, region=spec.region)[0], dtype=float)
    left, top, right, bottom = image_boxes(grid)[grid.target_index]
    inside = noisy[top:bottom, left:right] - 128
    outside = noisy.copy()
    outside[top:bottom, left:right] = 128
    assert np.all(outside == 128)  # nothing outside the target's pasted image changed
    # Clipped to 0..255: std 225 around 128 saturates most pixels; the mean stays near 128.
    assert abs(inside.mean()) < 2 and (np.abs(inside) == 127).mean() + (inside == -128).mean() > 0.5
    pip = _recipe("pic_in_pic", 2)
    background = Image.new("RGB", (384, 288), (128, 128, 128))
    spec = official.noise["pic_in_pic"]
    noisy = np.asarray(perturb_target([background], pip, spec.std, seed=0, region=spec.region)[0], dtype=float) - 128
    assert noisy.std() == pytest.approx(49, rel=0.03) and abs(noisy.mean()) < 1  # the whole image, unclipped
    again = np.asarray(perturb_target([background], pip, spec.std, seed=0, region=spec.region)[0], dtype=float) - 128
    assert np.array_equal(noisy, again)


def test_pairs_command_takes_the_noise_flags(capsys):
    from cli.main import build_parser, main

    args = build_parser().parse_args(["pairs", "--dataset", "d", "--out", "o", "--noise-std", "20", "--noise-formats", "grid,sequence"])
    assert (args.noise_std, args.noise_formats) == (20.0, "grid,sequence")
    # The config is checked before anything is ingested or loaded.
    assert main(["pairs", "--dataset", "d", "--out", "o", "--noise-std", "300"]) == 2
    assert "less than or equal to 255" in capsys.readouterr().err
