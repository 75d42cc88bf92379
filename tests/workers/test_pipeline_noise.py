"""Input perturbation (DESIGN 2.3): generation and the attention pass see noise on the target, the export
does not."""

from __future__ import annotations

import glob
from dataclasses import replace

import pytest
from datasets import load_dataset

from core.dataset import read_samples
from core.store import ArtifactStore
from workers.augment import IMAGE_COUNTS, Recipe
from workers.backends.hf import HFBackend
from workers.generate import GenerationConfig
from workers.ingest import IngestLimits, ingest
from workers.pipeline import PipelineConfig, merge_and_export, process_shard, write_records
from workers.postselect import PostSelectionConfig
from workers.render import encode_png, render_recipe, store_loader
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
    noisy_config = replace(clean_config, noise_std=80.0)
    backend = HFBackend(tiny_llava)  # attention recorded during generation: the ratios saw the same pixels
    clean = process_shard(samples, clean_config, 0, 8, handle=tiny_llava, backend=backend, load=load)
    noisy = process_shard(samples, noisy_config, 0, 8, handle=tiny_llava, backend=backend, load=load)

    formats = {r["recipe"]["format"] for r in clean}
    assert formats == {"sequence", "grid", "pic_in_pic"}
    for a, b in zip(clean, noisy, strict=True):
        assert a["recipe"] == b["recipe"]  # noise changes what the model sees, not what is asked
        if a["recipe"]["format"] in noisy_config.noise_formats:
            assert _judged(a) != _judged(b), a["uid"]
        else:  # sequence is not in the default noise formats
            assert _judged(a) == _judged(b), a["uid"]
    # The same config gives the same records: the noise is seeded.
    assert process_shard(samples, noisy_config, 0, 8, handle=tiny_llava, backend=backend, load=load) == noisy

    write_records(tmp_path / "shards" / "00000.jsonl", noisy)
    result = merge_and_export([tmp_path / "shards" / "00000.jsonl"], noisy_config, tmp_path / "export", load)
    ds = load_dataset("parquet", data_files=sorted(glob.glob(str(tmp_path / "export" / "data" / "*.parquet"))), split="train")
    assert len(ds) == result.num_pairs > 0
    by_uid = {r["uid"]: Recipe.from_dict(r["recipe"]) for r in noisy}
    exported = set()
    for row in ds:
        recipe = by_uid[row["uid"]]
        images = [im.convert("RGB") for im in row["images"]]  # decoded from the stored PNG
        assert [encode_png(im) for im in images] == [encode_png(im) for im in render_recipe(recipe, load)]
        exported.add(recipe.format)
    assert exported & {"grid", "pic_in_pic"}  # a noised format was exported, and exported clean
    assert noisy_config.to_dict()["noise_std"] == 80.0
    assert PipelineConfig.from_dict(noisy_config.to_dict()) == noisy_config


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_std": -1.0}, "noise_std must be in"),
        ({"noise_std": 300.0}, "noise_std must be in"),
        ({"noise_std": float("nan")}, "noise_std must be in"),
        ({"noise_formats": ("grid", "collage")}, "noise_formats must be"),
        ({"noise_formats": ("grid", "grid")}, "noise_formats must be"),
    ],
)
def test_noise_config_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PipelineConfig(**kwargs)


def test_noise_config_defaults_and_old_records():
    config = PipelineConfig(noise_std=12.5, noise_formats=("sequence",))
    assert PipelineConfig.from_dict(config.to_dict()) == config
    old = {k: v for k, v in PipelineConfig().to_dict().items() if not k.startswith("noise_")}
    assert PipelineConfig.from_dict(old) == PipelineConfig()
    assert (PipelineConfig().noise_std, PipelineConfig().noise_formats) == (0.0, ("grid", "pic_in_pic"))


def test_pairs_command_takes_the_noise_flags(capsys):
    from cli.main import build_parser, main

    args = build_parser().parse_args(["pairs", "--dataset", "d", "--out", "o", "--noise-std", "20", "--noise-formats", "grid,sequence"])
    assert (args.noise_std, args.noise_formats) == (20.0, "grid,sequence")
    # The config is checked before anything is ingested or loaded.
    assert main(["pairs", "--dataset", "d", "--out", "o", "--noise-std", "300"]) == 2
    assert "noise_std must be in [0, 255], got 300.0" in capsys.readouterr().err
