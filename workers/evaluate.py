"""Evaluation (DESIGN 6): did training help? Multi-image accuracy, single-image accuracy, confused images.

A model (optionally with a training's adapter) answers held-out prompts made the MIA-DPO way from a
dataset with ground truth, and the same samples as plain single-image prompts. Distractors come, where
the dataset allows, from samples asking the same question (`make_recipes(same_question=True)`), so every
image in a prompt has a truth: an answer that equals another image's truth and not the target's is a
*confused image*, the failure MIA-DPO targets.

Matching rule: normalised exact match (case, whitespace and final punctuation ignored); when the truth is
a multiple-choice option letter ("B", "(B)", "B."), the option letter the answer starts with.

The same attention pass as the pipeline's runs on every multi-image answer (recorded during generation
with the hf backend), so an evaluation also tells how well the attention ratio separates answers about the
wrong image from right ones (`attention_auc`, per format and `attention_rows` setting).

Shards like pair sets: `evaluate_shard` does recipes [start, stop), `summarise` reads every shard's records.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from core.dataset import Sample
from workers.attention import ROWS
from workers.augment import FORMATS, AugmentMix, Recipe, make_recipes
from workers.generate import GenerationBackend, GenerationConfig, PromptInput
from workers.pipeline import PipelineConfig, candidate_probes, candidate_ratios, model_fit
from workers.render import Loader, render_image, render_recipe

MATCHING_RULE = (
    "normalised exact match: case, whitespace and final punctuation ignored; for a multiple-choice truth "
    "(an option letter), the option letter the answer gives"
)
_FINAL_PUNCTUATION = ".!?;:,"
_OPTION = re.compile(r"^\(?([A-Za-z])\)?[.:)]?$")
_ANSWER_OPTION = re.compile(r"^\s*\(?([A-Za-z])(?:[.:)]|\s|$)")


@dataclass(frozen=True)
class EvalConfig:
    """What an evaluation asks; the same config and seed give the same prompts."""

    model: str = field(default="tiny-llava", metadata={"help": "The model to evaluate (built-in, folder or cached hub id)."})
    num: int = field(default=100, metadata={"help": "Multi-image prompts (each sample is also asked alone)."})
    formats: tuple[str, ...] = field(default=FORMATS, metadata={"help": "Formats of the multi-image prompts."})
    mix: AugmentMix = field(default_factory=AugmentMix, metadata={"help": "Format and image-count proportions."})
    seed: int = field(default=0, metadata={"help": "The one seed of the evaluation."})
    max_new_tokens: int = field(default=32, metadata={"help": "Most new tokens per answer."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate call."})
    shard_size: int = field(default=200, metadata={"help": "Prompts per shard job."})
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "LM layers for the attention ratios."})

    def __post_init__(self) -> None:
        if self.num < 1:
            raise ValueError(f"num must be >= 1, got {self.num}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if not self.formats or set(self.formats) - set(FORMATS):
            raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {list(self.formats)}")
        GenerationConfig(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)  # validates both

    @property
    def generation(self) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mix"], d["formats"] = self.mix.to_dict(), list(self.formats)
        return d


# -- scoring -------------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Case-folded, inner whitespace collapsed, final punctuation dropped."""
    return " ".join(text.split()).casefold().rstrip(_FINAL_PUNCTUATION).rstrip()


def option_letter(truth: str) -> str | None:
    """The option letter a multiple-choice truth is ("B", "(B)", "B."), else None."""
    match = _OPTION.match(truth.strip())
    return match.group(1).upper() if match else None


def matches(answer: str, truth: str) -> bool:
    """The matching rule (`MATCHING_RULE`)."""
    letter = option_letter(truth)
    if letter is not None:
        given = _ANSWER_OPTION.match(answer)
        return given is not None and given.group(1).upper() == letter
    return normalise(answer) == normalise(truth)


def score(answer: str, truths: Sequence[str | None], target: int) -> tuple[bool, int | None]:
    """Whether `answer` is right about image `target`, and else which other image's truth it gives.

    Returns:
        (correct, confused_with): confused_with is the first other image whose truth the answer matches
        (and the target's it does not), None otherwise.
    """
    truth = truths[target]
    if truth is None:
        raise ValueError("the target image has no truth")
    if matches(answer, truth):
        return True, None
    for k, other in enumerate(truths):
        if k != target and other is not None and matches(answer, other):
            return False, k
    return False, None


# -- one shard -----------------------------------------------------------------------------------------


def eval_recipes(samples: Sequence[Sample], config: EvalConfig, start: int, stop: int) -> list[Recipe]:
    """The multi-image recipes [start, stop) of an evaluation (distractors ask the same question)."""
    mix = config.mix.only(config.formats)
    return make_recipes(samples, num=stop - start, seed=config.seed, mix=mix, start=start, same_question=True)


def single_prompt(recipe: Recipe) -> str:
    """The sample asked alone, as single-image instruction data asks it."""
    return f"<image>\n{recipe.question}"


def evaluate_shard(
    samples: Sequence[Sample],
    config: EvalConfig,
    start: int,
    stop: int,
    *,
    handle: Any,
    backend: GenerationBackend,
    load: Loader,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Answer recipes `start .. stop-1` as multi-image prompts and their samples alone; score both.

    Returns:
        One JSON-able record per prompt: the prompt, the answer, every image's truth, correct,
        confused_with, the attention ratios (both settings), and the single-image prompt's answer and score.
    """
    recipes = eval_recipes(samples, config, start, stop)
    fit = model_fit(handle)
    gen = config.generation
    # The pipeline's attention pass (its rows are computed for both settings anyway).
    probe_config = PipelineConfig(model=config.model, generation=gen, layers=config.layers)
    records: list[dict[str, Any]] = []
    for b in range(0, len(recipes), gen.batch_size):
        batch = recipes[b : b + gen.batch_size]
        multi = [PromptInput(r.uid, r.prompt, *fit(render_recipe(r, load))) for r in batch]
        single = [PromptInput(f"{r.uid}-single", single_prompt(r), *fit([render_image(r.target, load)])) for r in batch]
        seed = config.seed * 1_000_003 + start + b
        multi_answers = backend.generate(multi, replace(gen, seed=seed))
        single_answers = backend.generate(single, replace(gen, seed=seed))
        probes = candidate_probes(handle, multi, multi_answers, probe_config)
        for r, prompt, (answer,), (probe_result,), (alone,) in zip(batch, multi, multi_answers, probes, single_answers, strict=True):
            assert r.truths is not None
            correct, confused = score(answer.text, r.truths, r.target_index)
            records.append(
                {
                    "uid": r.uid,
                    "sample_id": r.sample_id,
                    "format": r.format,
                    "n_images": r.n_images,
                    "target_index": r.target_index,
                    "prompt": r.prompt,
                    "answer": answer.text,
                    "truth": r.answer,
                    "truths": list(r.truths),
                    "correct": correct,
                    "confused_with": confused,
                    "ratios": candidate_ratios(r, prompt, probe_result),
                    "single": {"prompt": single_prompt(r), "answer": alone.text, "correct": matches(alone.text, r.answer)},
                    "recipe": r.to_dict(),
                }
            )
        if on_batch is not None:
            on_batch(len(batch))
    return records


# -- the whole evaluation ------------------------------------------------------------------------------


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """P(a positive scores above a negative), ties half (the Mann-Whitney AUC); None without both."""
    if not positives or not negatives:
        return None
    wins = 0.0
    for p in positives:
        for n in negatives:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(positives) * len(negatives))


def summarise(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy overall, per format and per image count; single-image accuracy; the confused-image rate;
    and the attention ratio's AUC at telling right answers from confused ones, per format and setting."""
    total = correct = confused = single_total = single_correct = 0
    by_format: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # total, correct, confused
    by_count: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    ratios: dict[str, dict[str, tuple[list[float], list[float]]]] = defaultdict(lambda: {r: ([], []) for r in ROWS})
    for rec in records:
        total += 1
        correct += rec["correct"]
        confused += rec["confused_with"] is not None
        for table, key in ((by_format, rec["format"]), (by_count, f"{rec['format']}/{rec['n_images']}")):
            row = table[key]
            row[0] += 1
            row[1] += rec["correct"]
            row[2] += rec["confused_with"] is not None
        single_total += 1
        single_correct += rec["single"]["correct"]
        if rec["correct"] or rec["confused_with"] is not None:
            for rows, value in rec["ratios"].items():
                if value is not None:
                    ratios[rec["format"]][rows][0 if rec["correct"] else 1].append(value)

    def table(rows: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
        return {
            key: {"n": n, "accuracy": _rate(c, n), "confused_rate": _rate(x, n)}
            for key, (n, c, x) in sorted(rows.items(), key=lambda kv: _order_key(kv[0]))
        }

    per_format = table(by_format)
    accuracies = [v["accuracy"] for v in per_format.values() if v["accuracy"] is not None]
    return {
        "matching_rule": MATCHING_RULE,
        "multi_image": {
            "n": total,
            "accuracy": _rate(correct, total),
            "format_average": sum(accuracies) / len(accuracies) if accuracies else None,
            "confused_rate": _rate(confused, total),
            "per_format": per_format,
            "per_image_count": table(by_count),
        },
        "single_image": {"n": single_total, "accuracy": _rate(single_correct, single_total)},
        "attention_auc": {
            fmt: {rows: auc(*pair) for rows, pair in by_rows.items()} for fmt, by_rows in sorted(ratios.items())
        },
    }


def _order_key(key: str) -> tuple[int, int]:
    fmt, _, count = key.partition("/")
    return (FORMATS.index(fmt) if fmt in FORMATS else len(FORMATS), int(count) if count else 0)
