"""The demo's request is one the API takes, and its last table shows base and adapter side by side.
(The demo itself runs the whole stack for minutes: `make demo`.)"""

from __future__ import annotations

from app.schemas import PairSetCreate
from cli.demo import PAIRSET_REQUEST, accuracy_table


def test_the_demo_pairset_request_validates_with_its_held_out_evaluation():
    train = {**PAIRSET_REQUEST["train"], "evaluation": {**PAIRSET_REQUEST["train"]["evaluation"], "dataset_id": "ds_heldout"}}
    body = PairSetCreate.model_validate({**PAIRSET_REQUEST, "dataset_id": "ds_train", "train": train})
    assert body.model == "shapes-llava"
    assert body.train is not None and body.train.evaluation is not None
    assert body.train.evaluation.dataset_id == "ds_heldout"


def test_accuracy_table_puts_base_and_adapter_side_by_side():
    def result(single: float, seq: float, grid: float | None, confused: float) -> dict:
        per_format = {"sequence": {"accuracy": seq}, "grid": {"accuracy": grid}}
        average = seq if grid is None else (seq + grid) / 2
        return {"single_image": {"accuracy": single}, "multi_image": {"per_format": per_format, "format_average": average, "confused_rate": confused}}

    lines = accuracy_table(result(0.9, 0.5, 0.25, 0.3), result(0.875, 0.75, None, 0.1), 48)
    assert "48 multi-image prompts" in lines[0]
    assert lines[1].split() == ["base", "adapter"]
    rows = {line[:20].strip(): line[20:].split("%") for line in lines[2:]}
    assert [c.strip() for c in rows["single-image"][:2]] == ["90.0", "87.5"]
    assert [c.strip() for c in rows["sequence"][:2]] == ["50.0", "75.0"]
    assert rows["grid"][0].strip() == "25.0" and rows["grid"][1].strip() == "-"
    assert [c.strip() for c in rows["confused image"][:2]] == ["30.0", "10.0"]
    assert "multi-image (avg)" in rows
