"""The built-in trained `shapes-llava` (DESIGN 6): shipped with the package, answers single-image prompts,
answers multi-image prompts fluently (a colour or a shape word, never broken text), confusing images."""

from __future__ import annotations

from pathlib import Path

from core.dataset import read_samples
from core.settings import Settings
from core.store import ArtifactStore
from workers.backends.hf import HFBackend
from workers.evaluate import EvalConfig, evaluate_shard, summarise
from workers.ingest import IngestLimits, ingest
from workers.models import BUILTINS, load_model
from workers.render import store_loader
from workers.sample_data import COLORS, SHAPES, write_sample_data


def test_shapes_llava_is_packaged_small_and_answers_held_out_samples(tmp_path: Path):
    entry = BUILTINS["shapes-llava"]
    assert entry.family == "llava" and entry.packaged is not None
    weights = entry.packaged / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 8 * 2**20  # a few MB, in the package

    store = ArtifactStore(tmp_path / "store")
    write_sample_data(tmp_path / "sd", num_samples=24, seed=4242, style="single")  # a seed it was not trained on
    ingest(tmp_path / "sd", store, "ds", limits=IngestLimits(10**9, 1000, 200.0, 10**8, 512))
    samples = read_samples(store, "ds")
    handle = load_model("shapes-llava", Settings(data_dir=tmp_path / "data"))
    config = EvalConfig(model="shapes-llava", num=16, seed=5, max_new_tokens=12, batch_size=16)
    records = evaluate_shard(samples, config, 0, 16, handle=handle, backend=HFBackend(handle), load=store_loader(store))
    summary = summarise(records)
    assert summary["single_image"]["accuracy"] >= 0.75, [(r["single"]["answer"], r["truth"]) for r in records]
    vocabulary = set(COLORS) | set(SHAPES)
    assert all(r["answer"] in vocabulary for r in records), [r["answer"] for r in records]  # fluent
