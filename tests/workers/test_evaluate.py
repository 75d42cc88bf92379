"""Evaluation (DESIGN 6): the scoring on hand-made answers, question-matched prompts, and a small run."""

from __future__ import annotations

import pytest

from core.dataset import Sample, read_samples
from core.store import ArtifactStore
from workers.augment import AugmentMix
from workers.backends.hf import HFBackend
from workers.evaluate import (
    EvalConfig,
    auc,
    eval_recipes,
    evaluate_shard,
    matches,
    normalise,
    score,
    summarise,
)
from workers.ingest import IngestLimits, ingest
from workers.render import store_loader
from workers.sample_data import write_sample_data


def test_normalised_exact_match():
    assert normalise("  The Circle is   RED. ") == "the circle is red"
    assert matches("the circle is red", "The circle is red.") and matches("The circle is red!", "The circle is red.")
    assert not matches("The circle is red and blue.", "The circle is red.")
    assert not matches("The circle is blue.", "The circle is red.")
    assert not matches("red", "The circle is red.")  # exact, not contained


def test_multiple_choice_takes_the_option_letter():
    for answer in ("B", "B.", "(B) a dog", "b) A dog.", "B: a dog"):
        assert matches(answer, "B"), answer
        assert matches(answer, "(B)") and matches(answer, "B.")
    for answer in ("A", "Because it is B", "", "The answer is B"):
        assert not matches(answer, "B"), answer


def test_confused_image_attribution():
    truths = ["The circle is red.", "The circle is blue.", "The circle is green.", "The circle is red."]
    assert score("The circle is blue.", truths, target=2) == (False, 1)  # another image's truth
    assert score("the circle is green", truths, target=2) == (True, None)
    assert score("The circle is purple.", truths, target=2) == (False, None)  # wrong, but no image's
    # An answer that is the target's truth is right even if another image shares it.
    assert score("The circle is red.", truths, target=0) == (True, None)
    assert score("The circle is red.", truths, target=1) == (False, 0)
    assert score("The circle is red.", ["The circle is blue.", None, "The circle is red."], target=0) == (False, 2)
    with pytest.raises(ValueError):
        score("x", [None, "y"], target=0)


def test_auc():
    assert auc([0.9, 0.8], [0.1, 0.2]) == 1.0 and auc([0.1], [0.9]) == 0.0
    assert auc([0.5], [0.5]) == 0.5 and auc([], [0.1]) is None


def test_distractors_ask_the_same_question():
    samples = [
        Sample(f"s{i}", f"{i:064x}", 100, 80, "What color is the circle?" if i % 2 else "How many shapes?", f"Answer {i}.")
        for i in range(20)
    ]
    config = EvalConfig(num=60, seed=2, mix=AugmentMix(sequence_counts={2: 1, 3: 1}, grid_counts={2: 1, 4: 1}))
    by_id = {s.id: s for s in samples}
    for r in eval_recipes(samples, config, 0, 60):
        assert r.truths is not None and r.truths[r.target_index] == r.answer
        for image, truth in zip(r.images, r.truths, strict=True):
            sample = by_id[image.sample_id]
            assert sample.question == r.question and truth == sample.answer


def test_summary_tables():
    def rec(fmt, n, correct, confused, single, ratio):
        return {"format": fmt, "n_images": n, "correct": correct, "confused_with": confused,
                "single": {"correct": single}, "ratios": {"answer_tokens": ratio, "producing": 1 - ratio}}  # fmt: skip

    records = [rec("grid", 2, True, None, True, 0.9), rec("grid", 2, False, 1, True, 0.2), rec("grid", 4, False, None, False, 0.5),
               rec("sequence", 3, True, None, True, 0.7)]  # fmt: skip
    s = summarise(records)
    multi = s["multi_image"]
    assert (multi["n"], multi["accuracy"], multi["confused_rate"]) == (4, 0.5, 0.25)
    assert multi["per_format"]["grid"] == {"n": 3, "accuracy": 1 / 3, "confused_rate": 1 / 3}
    assert multi["per_image_count"]["grid/2"] == {"n": 2, "accuracy": 0.5, "confused_rate": 0.5}
    assert multi["format_average"] == pytest.approx((1 / 3 + 1) / 2)
    assert s["single_image"] == {"n": 4, "accuracy": 0.75}
    assert s["attention_auc"]["grid"] == {"answer_tokens": 1.0, "producing": 0.0}
    assert list(multi["per_format"]) == ["sequence", "grid"]  # in the project's format order


def test_a_small_evaluation_runs_and_scores_what_the_model_said(tmp_path, tiny_llava):
    store = ArtifactStore(tmp_path / "store")
    write_sample_data(tmp_path / "sd", num_samples=16, seed=1)
    ingest(tmp_path / "sd", store, "ds", limits=IngestLimits(10**9, 1000, 200.0, 10**8, 512))
    samples = read_samples(store, "ds")
    config = EvalConfig(num=4, seed=3, max_new_tokens=4, batch_size=4)
    records = evaluate_shard(samples, config, 0, 4, handle=tiny_llava, backend=HFBackend(tiny_llava), load=store_loader(store))
    assert len(records) == 4
    for rec in records:
        assert (rec["correct"], rec["confused_with"]) == score(rec["answer"], rec["truths"], rec["target_index"])
        assert rec["single"]["correct"] == matches(rec["single"]["answer"], rec["truth"])
        assert rec["prompt"].count("<image>") == (rec["n_images"] if rec["format"] == "sequence" else 1)
        assert set(rec["ratios"]) == {"answer_tokens", "producing"}
    summary = summarise(records)
    assert summary["multi_image"]["n"] == summary["single_image"]["n"] == 4
