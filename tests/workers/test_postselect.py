import math
import random

import numpy as np
import pytest

from workers.postselect import (
    PairStats,
    PostSelectionConfig,
    edit_distance,
    fit_fences,
    normalised_edit_distance,
    tukey_fences,
)


def _levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def test_edit_distance_matches_the_textbook_dp():
    rng = random.Random(0)
    for _ in range(500):
        a = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 90)))
        b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 90)))
        assert edit_distance(a, b) == _levenshtein(a, b)
    assert edit_distance("kitten", "sitting") == 3
    assert normalised_edit_distance("", "") == 0.0
    assert normalised_edit_distance("abc", "xyz") == 1.0


def test_tukey_fences_on_a_known_distribution():
    values = np.arange(1, 101, dtype=float)  # Q1 = 25.75, Q3 = 75.25, IQR = 49.5
    lo, hi = tukey_fences(values, 1.5)
    assert lo == pytest.approx(25.75 - 74.25) and hi == pytest.approx(75.25 + 74.25)
    assert tukey_fences(np.array([np.nan, np.inf]), 1.5) == (-math.inf, math.inf)


def test_fences_remove_the_expected_tails():
    rng = np.random.default_rng(0)
    stats = [PairStats(float(p), float(r), float(d)) for p, r, d in zip(rng.normal(10, 1, 200), np.exp(rng.normal(0, 0.1, 200)), rng.uniform(0.4, 0.6, 200), strict=True)]
    outliers = [
        PairStats(50.0, 1.0, 0.5),  # very unsure rejected answer
        PairStats(10.0, 4.0, 0.5),  # four times longer
        PairStats(10.0, 0.25, 0.5),  # four times shorter
        PairStats(10.0, 1.0, 0.01),  # nearly the chosen answer
        PairStats(1.0, 1.0, 0.99),  # low perplexity and very different: only the high tails count
    ]
    fences = fit_fences(stats + outliers, PostSelectionConfig())
    assert [fences.reason(s) for s in outliers] == ["perplexity", "length_ratio", "length_ratio", "edit_distance", None]
    removed = sum(fences.reason(s) is not None for s in stats)
    assert removed < 0.05 * len(stats)  # a normal bulk loses only a few percent, as the paper's ~5 %


def test_disabled_filters_and_small_sets_filter_nothing():
    stats = [PairStats(10.0, 1.0, 0.5)] * 20 + [PairStats(1e6, 100.0, 0.0)]
    cfg = PostSelectionConfig(perplexity=False, length_ratio=False, edit_distance=False)
    assert fit_fences(stats, cfg).reason(stats[-1]) is None
    assert fit_fences(stats[-3:], PostSelectionConfig(min_pairs=8)).reason(stats[-1]) is None
    with pytest.raises(ValueError, match="k must"):
        PostSelectionConfig(k=0)
