"""Post-selection (DESIGN 2.5): drop outlier pairs by three statistics over the whole pair set.

- perplexity of the rejected answer under the model: the high tail is low-confidence noise;
- length ratio rejected/chosen in tokens: far from 1 either way (fences on its log, so x2 and x0.5 are
  equally far);
- normalised edit distance between chosen and rejected: the low tail is near-identical answers.

The paper removes about 5 % and gives no thresholds; we use Tukey fences (Q1 - k IQR, Q3 + k IQR) with
k = 1.5 by default, on the tails named above. Fitting needs only the three numbers per pair, so it is
one pass over the shard files holding a few floats per pair; filtering is a second pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

FILTERS = ("perplexity", "length_ratio", "edit_distance")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, Myers' bit-parallel algorithm (one big-int pass per character of `b`)."""
    if len(a) < len(b):
        a, b = b, a
    m = len(a)
    if m == 0:
        return len(b)
    peq: dict[str, int] = {}
    for i, ch in enumerate(a):
        peq[ch] = peq.get(ch, 0) | (1 << i)
    mask = (1 << m) - 1
    high = 1 << (m - 1)
    pv, mv, score = mask, 0, m
    for ch in b:
        eq = peq.get(ch, 0)
        xv = eq | mv
        xh = ((((eq & pv) + pv) & mask) ^ pv) | eq
        ph = mv | (~(xh | pv) & mask)
        mh = pv & xh
        if ph & high:
            score += 1
        elif mh & high:
            score -= 1
        ph = ((ph << 1) | 1) & mask
        mh = (mh << 1) & mask
        pv = mh | (~(xv | ph) & mask)
        mv = ph & xv
    return score


def normalised_edit_distance(a: str, b: str) -> float:
    """Edit distance over the longer length: 0 identical, 1 nothing in common."""
    longest = max(len(a), len(b))
    return edit_distance(a, b) / longest if longest else 0.0


@dataclass(frozen=True)
class PostSelectionConfig:
    """Which outlier filters run and how wide the fences are."""

    k: float = field(default=1.5, metadata={"help": "Tukey fence width in IQRs (1.5 = classic outliers)."})
    perplexity: bool = field(default=True, metadata={"help": "Drop the high-perplexity tail of rejected answers."})
    length_ratio: bool = field(default=True, metadata={"help": "Drop length ratios far from 1 (both tails)."})
    edit_distance: bool = field(default=True, metadata={"help": "Drop near-identical chosen/rejected (low tail)."})
    min_pairs: int = field(default=8, metadata={"help": "Below this many pairs, quartiles mean little: filter nothing."})

    def __post_init__(self) -> None:
        if not self.k > 0 or math.isinf(self.k):
            raise ValueError(f"k must be a positive number, got {self.k}")
        if self.min_pairs < 0:
            raise ValueError(f"min_pairs must be >= 0, got {self.min_pairs}")


@dataclass(frozen=True)
class PairStats:
    """The three statistics of one pair."""

    perplexity: float
    length_ratio: float
    edit_distance: float


def tukey_fences(values: np.ndarray, k: float) -> tuple[float, float]:
    """(Q1 - k IQR, Q3 + k IQR) of finite values; (-inf, inf) when there are none."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return -math.inf, math.inf
    q1, q3 = np.percentile(finite, [25, 75])
    iqr = q3 - q1
    return float(q1 - k * iqr), float(q3 + k * iqr)


@dataclass
class Fences:
    """Fitted bounds; a pair outside any enabled bound is removed by the first filter it fails."""

    perplexity_max: float = math.inf
    log_length_ratio: tuple[float, float] = (-math.inf, math.inf)
    edit_distance_min: float = -math.inf
    num_pairs: int = 0

    def reason(self, stats: PairStats) -> str | None:
        """The filter that removes this pair, or None if it stays."""
        if not stats.perplexity <= self.perplexity_max:  # NaN perplexity is not confident either
            return "perplexity"
        lo, hi = self.log_length_ratio
        log_ratio = math.log(stats.length_ratio) if stats.length_ratio > 0 else -math.inf
        if not lo <= log_ratio <= hi:
            return "length_ratio"
        if stats.edit_distance < self.edit_distance_min:
            return "edit_distance"
        return None

    def to_dict(self) -> dict:
        return {
            "perplexity_max": self.perplexity_max,
            "length_ratio_min": math.exp(self.log_length_ratio[0]) if math.isfinite(self.log_length_ratio[0]) else 0.0,
            "length_ratio_max": math.exp(self.log_length_ratio[1]) if math.isfinite(self.log_length_ratio[1]) else math.inf,
            "edit_distance_min": self.edit_distance_min,
            "num_pairs": self.num_pairs,
        }


def fit_fences(stats: Iterable[PairStats], config: PostSelectionConfig) -> Fences:
    """One pass over the pair set's statistics: the fences every pair is then judged by.

    Args:
        stats: the statistics of every pair in the set (any iterable, e.g. read from shard files).
        config: fence width and enabled filters.

    Returns:
        The fitted fences (unbounded for disabled filters or fewer than `min_pairs` pairs).
    """
    ppl, ratio, dist = [], [], []
    for s in stats:
        ppl.append(s.perplexity)
        ratio.append(math.log(s.length_ratio) if s.length_ratio > 0 else -math.inf)
        dist.append(s.edit_distance)
    fences = Fences(num_pairs=len(ppl))
    if len(ppl) < max(config.min_pairs, 1):
        return fences
    if config.perplexity:
        fences.perplexity_max = tukey_fences(np.asarray(ppl, dtype=np.float64), config.k)[1]
    if config.length_ratio:
        fences.log_length_ratio = tukey_fences(np.asarray(ratio, dtype=np.float64), config.k)
    if config.edit_distance:
        fences.edit_distance_min = tukey_fences(np.asarray(dist, dtype=np.float64), config.k)[0]
    return fences
