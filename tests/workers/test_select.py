import pytest

from workers.select import (
    EMPTY,
    EQUALS_GROUND_TRUTH,
    KEPT,
    NO_RATIO,
    NOT_HALLUCINATED,
    NOT_LOWEST,
    PERPLEXITY_GATE,
    PRESETS,
    SelectionConfig,
    select,
)


def test_presets_match_design_value_for_value():
    assert PRESETS["paper"] == {
        "sequence": {2: 0.7, 3: 0.6, 4: 0.5, 5: 0.5},
        "grid": {2: 0.7, 3: 0.6, 4: 0.5, 6: 0.4, 9: 0.4},
        "pic_in_pic": {2: 0.6},
    }
    assert PRESETS["official_code"] == {
        "sequence": {2: 0.8, 3: 0.7, 4: 0.6, 5: 0.6},
        "grid": {2: 0.7, 3: 0.6, 4: 0.5, 6: 0.4, 9: 0.3},
        "pic_in_pic": {2: 0.8},
    }
    assert SelectionConfig().threshold("grid", 9) == 0.4
    assert SelectionConfig(preset="official_code").threshold("pic_in_pic", 2) == 0.8


def test_overrides_win_and_bad_values_name_the_parameter():
    cfg = SelectionConfig(thresholds={"grid": {9: 0.25}})
    assert cfg.threshold("grid", 9) == 0.25 and cfg.threshold("grid", 6) == 0.4
    with pytest.raises(ValueError, match="preset"):
        SelectionConfig(preset="nope")
    with pytest.raises(ValueError, match="image count 7"):
        SelectionConfig(thresholds={"grid": {7: 0.5}})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SelectionConfig(thresholds={"sequence": {2: 1.5}})
    with pytest.raises(ValueError, match="unknown format"):
        SelectionConfig(thresholds={"collage": {2: 0.5}})


def test_rule_on_hand_made_candidates():
    texts = ["The cube is red.", "  the CUBE is   red. ", "", "A blue ball.", "A green cone.", "Two dogs.", "x"]
    ratios = [0.2, 0.1, 0.05, 0.3, 0.9, 0.5, None]
    verdicts, rejected = select("The cube is red.", texts, ratios, threshold=0.5)
    assert [v.reason for v in verdicts] == [
        EQUALS_GROUND_TRUTH,  # same words as the truth
        EQUALS_GROUND_TRUTH,  # differs only in case and whitespace
        EMPTY,
        KEPT,  # lowest ratio among those that differ from the truth
        NOT_HALLUCINATED,
        NOT_LOWEST,  # ratio == threshold counts as hallucinated
        NO_RATIO,
    ]
    assert rejected == 3
    assert [v.hallucinated for v in verdicts] == [True, True, True, True, False, True, False]


def test_no_pair_when_nothing_hallucinated():
    verdicts, rejected = select("yes", ["no", "maybe"], [0.8, 0.9], threshold=0.7)
    assert rejected is None and {v.reason for v in verdicts} == {NOT_HALLUCINATED}


def test_ties_pick_the_first():
    _, rejected = select("yes", ["no", "nope"], [0.3, 0.3], threshold=0.7)
    assert rejected == 0


def test_strict_comparison_and_the_official_rules():
    # At the threshold: hallucinated with <=, not with < (the official grid and pic-in-pic rule).
    verdicts, rejected = select("yes", ["no"], [0.5], threshold=0.5)
    assert rejected == 0 and verdicts[0].reason == KEPT
    verdicts, rejected = select("yes", ["no"], [0.5], threshold=0.5, strict=True)
    assert rejected is None and verdicts[0].reason == NOT_HALLUCINATED
    verdicts, rejected = select("yes", ["no"], [0.4999], threshold=0.5, strict=True)
    assert rejected == 0
    official = SelectionConfig(preset="official_code", comparison={"grid": "<", "pic_in_pic": "<"})
    assert (official.strict("sequence"), official.strict("grid"), official.strict("pic_in_pic")) == (False, True, True)
    assert not SelectionConfig().strict("grid")
    with pytest.raises(ValueError, match="comparison"):
        SelectionConfig(comparison={"grid": ">"})
    with pytest.raises(ValueError, match="attention_rows"):
        SelectionConfig(attention_rows="all")


def test_perplexity_gate_drops_confident_answers_only():
    """The official `ppl > 1.1`: a hallucinated answer written at perplexity <= 1.1 is not rejected."""
    texts, ratios = ["A cat.", "A dog.", "A cow."], [0.1, 0.2, 0.3]
    verdicts, rejected = select("A bird.", texts, ratios, 0.5, perplexities=[1.05, 1.1, 1.7], perplexity_gate=1.1)
    assert [v.reason for v in verdicts] == [PERPLEXITY_GATE, PERPLEXITY_GATE, KEPT] and rejected == 2
    verdicts, rejected = select("A bird.", texts[:2], ratios[:2], 0.5, perplexities=[1.0, float("nan")], perplexity_gate=1.1)
    assert rejected is None and [v.reason for v in verdicts] == [PERPLEXITY_GATE, PERPLEXITY_GATE]
    # Without a gate, perplexity plays no part.
    assert select("A bird.", texts, ratios, 0.5, perplexities=[1.0, 1.0, 1.0])[1] == 0
    with pytest.raises(ValueError, match="one perplexity per candidate"):
        select("A bird.", texts, ratios, 0.5, perplexity_gate=1.1)
