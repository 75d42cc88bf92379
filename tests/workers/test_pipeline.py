"""`miadpo pairs` end to end on the sample data, and the export straight into trl.DPOTrainer.

Two runs share the module: tiny-llava with 2 sampled candidates per prompt and tiny-qwen2.5-vl with 3,
so selection picks among several candidates and both families go through merge and export.
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path

import pytest
from datasets import load_dataset

from cli.main import main
from core.settings import get_settings
from tests.pairs_check import check_pairs, read_shard_records, source_answers

RUNS = {
    "tiny-llava": ["--num", "30", "--max-new-tokens", "12", "--shard-size", "16", "--seed", "5",
                   "--num-candidates", "2", "--temperature", "1.0"],
    "tiny-qwen2.5-vl": ["--num", "16", "--max-new-tokens", "10", "--shard-size", "8", "--seed", "3",
                        "--num-candidates", "3", "--temperature", "1.0"],
}


def _pairs(root: Path, model: str, out: Path) -> Path:
    assert main(["pairs", "--dataset", str(root / "sd"), "--out", str(out), "--model", model, *RUNS[model]]) == 0
    return out


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory):
    """The sample data and a data dir (built-in models, the ingested dataset) for the module."""
    root = tmp_path_factory.mktemp("pairs")
    mp = pytest.MonkeyPatch()
    mp.setenv("MIADPO_DATA_DIR", str(root / "data"))
    get_settings.cache_clear()
    try:
        assert main(["sample-data", str(root / "sd"), "--num", "24"]) == 0
        yield root
    finally:
        mp.undo()
        get_settings.cache_clear()


@pytest.fixture(scope="module")
def pairs_run(sample_root):
    return _pairs(sample_root, "tiny-llava", sample_root / "out")


@pytest.fixture(scope="module")
def qwen_run(sample_root):
    return _pairs(sample_root, "tiny-qwen2.5-vl", sample_root / "out-qwen")


def _card_counts(card: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"^\| (\w+) \| (\d+) \|$", card, flags=re.M)}


def test_card_counts_add_up(pairs_run):
    counts = _card_counts((pairs_run / "export" / "README.md").read_text())
    assert counts["prompts"] == 30
    assert counts["prompts"] == counts["hallucinated"] + counts["not_hallucinated"]
    removed = sum(counts[k] for k in ("perplexity", "length_ratio", "edit_distance"))
    assert counts["pairs"] == counts["selected_pairs"] - removed
    assert counts["pairs"] > 0  # a random tiny model's attention is arbitrary, but 30 prompts give some pairs


@pytest.mark.parametrize("run", ["pairs_run", "qwen_run"])
def test_export_loads_and_matches_the_records(run, request):
    """Every exported row against the shard records and the source file: chosen is the sample's own answer,
    rejected the text of the candidate selection kept (re-derived here: the hallucinated candidate with the
    lowest ratio that is not the answer), its ratio at or below the threshold of its format and image count."""
    out: Path = request.getfixturevalue(run)
    model = "tiny-llava" if run == "pairs_run" else "tiny-qwen2.5-vl"
    num_candidates = int(RUNS[model][RUNS[model].index("--num-candidates") + 1])
    records = read_shard_records(sorted((out / "shards").glob("*.jsonl")))
    files = sorted(glob.glob(str(out / "export" / "data" / "*.parquet")))
    ds = load_dataset("parquet", data_files=files, split="train")
    counts = _card_counts((out / "export" / "README.md").read_text())
    assert len(ds) == counts["pairs"] > 0
    outcomes = {json.loads(line)["uid"]: json.loads(line)["outcome"] for line in (out / "export" / "candidates.jsonl").read_text().splitlines()}
    assert sorted(ds["uid"]) == sorted(uid for uid, outcome in outcomes.items() if outcome == "exported")

    check_pairs(list(ds), records, source_answers(out.parent / "sd"), num_candidates)


def test_same_seed_same_pairs(pairs_run, tmp_path, monkeypatch):
    """A second run with the same seed writes byte-identical shard records."""
    monkeypatch.setenv("MIADPO_DATA_DIR", str(pairs_run.parent / "data"))
    get_settings.cache_clear()
    _pairs(pairs_run.parent, "tiny-llava", tmp_path)
    get_settings.cache_clear()
    for name in ("00000.jsonl", "00001.jsonl"):
        assert (tmp_path / "shards" / name).read_bytes() == (pairs_run / "shards" / name).read_bytes()


def test_dpo_trainer_takes_the_export_as_is(pairs_run, tmp_path, tiny_model_settings):
    """trl.DPOTrainer (tiny-llava, LoRA on the language model only, CPU, max_length=None): 2 steps, no conversion."""
    import torch
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from workers.models import load_model

    tiny_llava = load_model("tiny-llava", tiny_model_settings)  # our own copy: peft changes it in place
    files = sorted(glob.glob(str(pairs_run / "export" / "data" / "*.parquet")))
    ds = load_dataset("parquet", data_files=files, split="train")
    model = tiny_llava.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = DPOConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
        bf16=False, max_length=None, report_to=[], logging_steps=1, save_strategy="no",
        beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.1], use_cpu=True,
    )
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tiny_llava.processor, peft_config=lora)
    trainer.train()
    assert trainer.state.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    trained = trainer.model
    lora_names = [n for n, _ in trained.named_parameters() if "lora_" in n]
    assert lora_names and all("language_model" in n for n in lora_names)
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in lora_names)
    changed = [n for n, p in trained.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert changed  # lora_B starts at zero: it moved
    for name, param in trained.named_parameters():
        if "lora_" not in name:
            base = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(param, before[base]), name


def test_candidates_file_explains_every_prompt(pairs_run):
    import json

    rows = [json.loads(line) for line in (pairs_run / "export" / "candidates.jsonl").read_text().splitlines()]
    counts = _card_counts((pairs_run / "export" / "README.md").read_text())
    assert len(rows) == counts["prompts"]
    outcomes = [r["outcome"] for r in rows]
    assert outcomes.count("exported") == counts["pairs"]
    assert outcomes.count("no_pair") == counts["prompts"] - counts["selected_pairs"]
    for r in rows:
        reasons = [c["reason"] for c in r["candidates"]]
        assert ("kept" in reasons) == (r["outcome"] != "no_pair")
        for c in r["candidates"]:
            assert c["hallucinated"] == (c["ratio"] is not None and c["ratio"] <= r["threshold"])
