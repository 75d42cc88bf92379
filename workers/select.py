"""Attention-aware selection (DESIGN 2.4): which candidates looked at the wrong image, and the pair.

A candidate is *hallucinated* when its attention ratio (attention on the target image / on all
images) is at or below the threshold for its format and image count (strictly below, for the formats
whose comparison is `<`: the official code compares grid and pic-in-pic with `<`, sequence with `<=`).
The pair's rejected answer is the hallucinated candidate with the lowest ratio that still differs from
the ground truth; the chosen answer is the ground truth. With a perplexity gate (the official code's
`ppl > 1.1`), a hallucinated answer the model wrote with a perplexity at or below the gate is not
rejected either. Every candidate keeps a verdict with its reason, so a user can see why a pair exists
or not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

FORMATS = ("sequence", "grid", "pic_in_pic")
ATTENTION_ROWS = ("answer_tokens", "producing")  # workers.attention.ROWS
COMPARISONS = ("<=", "<")

# Thresholds by format and image count. `paper`: MIA-DPO paper; `official_code`: the released code.
PRESETS: dict[str, dict[str, dict[int, float]]] = {
    "paper": {
        "sequence": {2: 0.7, 3: 0.6, 4: 0.5, 5: 0.5},
        "grid": {2: 0.7, 3: 0.6, 4: 0.5, 6: 0.4, 9: 0.4},
        "pic_in_pic": {2: 0.6},
    },
    "official_code": {
        "sequence": {2: 0.8, 3: 0.7, 4: 0.6, 5: 0.6},
        "grid": {2: 0.7, 3: 0.6, 4: 0.5, 6: 0.4, 9: 0.3},
        "pic_in_pic": {2: 0.8},
    },
}

# Verdict reasons.
KEPT = "kept"  # this candidate is the pair's rejected answer
NOT_HALLUCINATED = "not_hallucinated"  # ratio above threshold: it looked at the right image
EQUALS_GROUND_TRUTH = "equals_ground_truth"  # hallucinated by attention, but the answer is the truth
EMPTY = "empty"  # nothing to prefer against
NOT_LOWEST = "hallucinated_not_lowest"  # hallucinated, but another candidate had a lower ratio
NO_RATIO = "no_ratio"  # the attention pass gave no ratio (e.g. no image tokens attended at all)
PERPLEXITY_GATE = "perplexity_gate"  # hallucinated, but written with a perplexity at or below the gate


@dataclass(frozen=True)
class SelectionConfig:
    """Thresholds (a preset's table and per-format overrides), how ratios compare with them, which
    attention rows make the ratio, and the optional perplexity gate."""

    preset: str = field(default="paper", metadata={"help": "Threshold table: paper or official_code."})
    thresholds: Mapping[str, Mapping[int, float]] = field(
        default_factory=dict,
        metadata={"help": "Overrides by format then image count, e.g. {'grid': {9: 0.35}}."},
    )
    attention_rows: str = field(
        default="producing",
        metadata={"help": "producing: the rows producing the answer's tokens (default, docs/fidelity.md); answer_tokens: the rows at them (official code)."},
    )
    comparison: Mapping[str, str] = field(
        default_factory=lambda: dict.fromkeys(FORMATS, "<="),
        metadata={"help": "Per format, hallucinated when ratio <= threshold or ratio < threshold (official: grid and pic-in-pic <)."},
    )
    perplexity_gate: float | None = field(
        default=None,
        metadata={"help": "Reject only answers whose official perplexity is above this (official code: 1.1); None: no gate."},
    )

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.attention_rows not in ATTENTION_ROWS:
            raise ValueError(f"attention_rows must be one of {ATTENTION_ROWS}, got {self.attention_rows!r}")
        comparison = {**dict.fromkeys(FORMATS, "<="), **dict(self.comparison)}
        for fmt, op in comparison.items():
            if fmt not in FORMATS or op not in COMPARISONS:
                raise ValueError(f"comparison must map formats {FORMATS} to one of {COMPARISONS}, got {fmt!r}: {op!r}")
        object.__setattr__(self, "comparison", comparison)
        if self.perplexity_gate is not None and not (isinstance(self.perplexity_gate, int | float) and math.isfinite(self.perplexity_gate) and self.perplexity_gate >= 0):
            raise ValueError(f"perplexity_gate must be a number >= 0 or None, got {self.perplexity_gate!r}")
        base = PRESETS[self.preset]
        for fmt, by_count in self.thresholds.items():
            if fmt not in base:
                raise ValueError(f"thresholds: unknown format {fmt!r} (expected one of {sorted(base)})")
            for count, value in by_count.items():
                if int(count) not in base[fmt]:
                    raise ValueError(f"thresholds[{fmt!r}]: image count {count} not used by {fmt}")
                if not 0.0 <= float(value) <= 1.0:
                    raise ValueError(f"thresholds[{fmt!r}][{count}] must be in [0, 1], got {value}")

    def threshold(self, fmt: str, n_images: int) -> float:
        """The threshold for a format and image count, override first."""
        override = self.thresholds.get(fmt, {})
        for key, value in override.items():
            if int(key) == n_images:
                return float(value)
        try:
            return PRESETS[self.preset][fmt][n_images]
        except KeyError:
            raise ValueError(f"no threshold for format {fmt!r} with {n_images} images") from None

    def strict(self, fmt: str) -> bool:
        """Whether a ratio equal to the threshold is *not* hallucinated for this format."""
        return self.comparison[fmt] == "<"


@dataclass(frozen=True)
class Verdict:
    """One candidate's outcome."""

    hallucinated: bool
    reason: str


def normalise_answer(text: str) -> str:
    """What 'differs from the ground truth' compares: trimmed, case-folded, inner whitespace collapsed."""
    return " ".join(text.split()).casefold()


def select(
    ground_truth: str,
    texts: Sequence[str],
    ratios: Sequence[float | None],
    threshold: float,
    *,
    strict: bool = False,
    perplexities: Sequence[float] | None = None,
    perplexity_gate: float | None = None,
) -> tuple[list[Verdict], int | None]:
    """Judge each candidate of one prompt and pick the rejected answer.

    Args:
        ground_truth: the dataset's answer (the pair's chosen answer).
        texts: candidate answers.
        ratios: their attention ratios (None when the attention pass could not give one).
        threshold: hallucinated when ratio <= threshold (< with `strict`).
        strict: compare with < instead of <=.
        perplexities: the candidates' (official) perplexities, for the gate.
        perplexity_gate: a hallucinated candidate is rejected only if its perplexity is above this.

    Returns:
        A verdict per candidate, and the index of the rejected candidate (None: no pair).
    """
    if len(texts) != len(ratios):
        raise ValueError(f"{len(texts)} texts but {len(ratios)} ratios")
    if perplexity_gate is not None and (perplexities is None or len(perplexities) != len(texts)):
        raise ValueError("a perplexity gate needs one perplexity per candidate")
    truth = normalise_answer(ground_truth)
    verdicts: list[Verdict] = []
    eligible: list[int] = []
    for i, (text, ratio) in enumerate(zip(texts, ratios, strict=True)):
        if ratio is None:
            verdicts.append(Verdict(False, NO_RATIO))
        elif ratio > threshold or (strict and ratio == threshold):
            verdicts.append(Verdict(False, NOT_HALLUCINATED))
        elif not text.strip():
            verdicts.append(Verdict(True, EMPTY))
        elif normalise_answer(text) == truth:
            verdicts.append(Verdict(True, EQUALS_GROUND_TRUTH))
        elif perplexity_gate is not None and not perplexities[i] > perplexity_gate:  # type: ignore[index]
            verdicts.append(Verdict(True, PERPLEXITY_GATE))  # nan perplexity: not above the gate either
        else:
            verdicts.append(Verdict(True, NOT_LOWEST))
            eligible.append(i)
    if not truth or not eligible:
        if not truth:  # a pair needs a non-empty chosen answer (ingestion already refuses these)
            verdicts = [Verdict(v.hallucinated, EMPTY if v.reason == NOT_LOWEST else v.reason) for v in verdicts]
        return verdicts, None
    rejected = min(eligible, key=lambda i: (ratios[i], i))
    verdicts[rejected] = Verdict(True, KEPT)
    return verdicts, rejected
