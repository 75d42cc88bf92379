"""`miadpo augment`: a dataset in, rendered multi-image prompts out (images/ and prompts.jsonl)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from cli.main import main
from core.settings import get_settings
from tests.pairs_check import source_answers

NUM = 12


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MIADPO_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield tmp_path / "data"
    get_settings.cache_clear()


def _augment(tmp_path, out: str, seed: int, formats: str = "sequence,grid,pic_in_pic") -> list[dict]:
    args = ["augment", "--dataset", str(tmp_path / "sd"), "--out", str(tmp_path / out), "--num", str(NUM), "--seed", str(seed), "--formats", formats]
    assert main(args) == 0
    return [json.loads(line) for line in (tmp_path / out / "prompts.jsonl").read_text().splitlines()]


def test_augment_writes_prompts_and_their_images_the_same_for_the_same_seed(data_dir, tmp_path):
    assert main(["sample-data", str(tmp_path / "sd"), "--num", "8"]) == 0
    sources = source_answers(tmp_path / "sd")
    rows = _augment(tmp_path, "a", seed=3)
    assert len(rows) == NUM and {r["format"] for r in rows} <= {"sequence", "grid", "pic_in_pic"}
    for row in rows:
        question, answer = sources[row["sample_id"]]
        assert row["answer"] == answer and question[0].lower() + question[1:] in row["prompt"]
        assert row["prompt"].count("<image>") == len(row["images"]) == (row["n_images"] if row["format"] == "sequence" else 1)
        assert 0 <= row["target_index"] < row["n_images"] == len(row["source_ids"])
        assert row["source_ids"][row["target_index"]] == row["sample_id"]  # the target is the question's image
        for name in row["images"]:
            with Image.open(tmp_path / "a" / name) as im:
                assert im.format == "PNG" and im.mode == "RGB" and min(im.size) > 0
    # The same seed gives the same bytes; another seed other prompts.
    _augment(tmp_path, "b", seed=3)
    assert (tmp_path / "a" / "prompts.jsonl").read_bytes() == (tmp_path / "b" / "prompts.jsonl").read_bytes()
    for name in {n for r in rows for n in r["images"]}:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert _augment(tmp_path, "c", seed=4) != rows
    # --formats is honoured.
    assert {r["format"] for r in _augment(tmp_path, "d", seed=3, formats="grid")} == {"grid"}
