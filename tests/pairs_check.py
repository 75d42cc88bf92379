"""What an exported pair must hold, checked against the shard records and the source dataset file.

Shared by the in-process pipeline tests and the end-to-end ones: chosen is the source sample's own
answer, rejected the text of the candidate the selection kept, and the selection itself is re-derived
here from the recorded ratios with the paper's thresholds written out (not read from the code under test).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# DESIGN 2.4, preset `paper`: by format, then by the recipe's image count.
PAPER_THRESHOLDS = {
    "sequence": {2: 0.7, 3: 0.6, 4: 0.5, 5: 0.5},
    "grid": {2: 0.7, 3: 0.6, 4: 0.5, 6: 0.4, 9: 0.4},
    "pic_in_pic": {2: 0.6},
}


def source_answers(dataset: Path) -> dict[str, tuple[str, str]]:
    """id -> (first question, first answer), from the LLaVA file `sample-data` wrote."""
    rows = json.loads((Path(dataset) / "llava.json").read_text())
    return {
        r["id"]: (r["conversations"][0]["value"].replace("<image>", "").strip(), r["conversations"][1]["value"].strip())
        for r in rows
    }


def read_shard_records(paths: Sequence[Path]) -> dict[str, dict[str, Any]]:
    records = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                records[rec["uid"]] = rec
    return records


def _normalised(text: str) -> str:
    return " ".join(text.split()).casefold()


def _text(messages: list[dict]) -> str:
    return "".join(p["text"] or "" for p in messages[0]["content"] if p["type"] == "text")


def check_pairs(
    rows: Sequence[Mapping[str, Any]],
    records: Mapping[str, Mapping[str, Any]],
    sources: Mapping[str, tuple[str, str]],
    num_candidates: int,
) -> None:
    """Assert every record's selection and every exported row (rows as `datasets` or pyarrow read them)."""
    for rec in records.values():
        fmt, n = rec["recipe"]["format"], len(rec["recipe"]["images"])
        threshold = PAPER_THRESHOLDS[fmt][n]
        assert rec["threshold"] == threshold and len(rec["candidates"]) == num_candidates, rec["uid"]
        truth = _normalised(sources[rec["recipe"]["sample_id"]][1])
        eligible = [
            i for i, c in enumerate(rec["candidates"])
            if c["ratio"] is not None and c["ratio"] <= threshold and c["text"].strip() and _normalised(c["text"]) != truth
        ]  # fmt: skip
        expected = min(eligible, key=lambda i: (rec["candidates"][i]["ratio"], i)) if eligible else None
        assert rec["rejected"] == expected, rec["uid"]

    several = 0
    for row in rows:
        rec = records[row["uid"]]
        question, answer = sources[row["source_id"]]
        kept = rec["candidates"][rec["rejected"]]
        fmt, n = row["format"], len(rec["recipe"]["images"])  # the threshold's image count: a collage's cells
        chosen, rejected = _text(row["chosen"]), _text(row["rejected"])
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        assert chosen == answer, row["uid"]
        assert rejected == kept["text"] and kept["reason"] == "kept", row["uid"]
        assert _normalised(chosen) != _normalised(rejected) and rejected.strip()
        assert row["attention_ratio"] == kept["ratio"] <= PAPER_THRESHOLDS[fmt][n], row["uid"]
        assert (fmt, row["target_index"]) == (rec["recipe"]["format"], rec["recipe"]["target_index"])
        assert question[0].lower() + question[1:] in _text(row["prompt"])  # the source question, rewritten
        n_parts = sum(p["type"] == "image" for p in row["prompt"][0]["content"])
        assert n_parts == len(row["images"]) == row["n_images"] == (n if fmt == "sequence" else 1)
        several += len({c["text"] for c in rec["candidates"]}) > 1
    assert num_candidates == 1 or several > 0  # the kept candidate was chosen among different answers
