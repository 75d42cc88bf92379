"""Multi-image augmentation recipes (DESIGN 2.2): which images, which layout, which prompt; no pixels.

A recipe names its source images by ref, the format, the target's position and the rewritten prompt.
Its pixels are rendered on demand by `workers.render`, so 200k candidates cost 200k small records,
not 200k collages.

Determinism: recipe `index` of pair-set `seed` depends only on (samples, index, seed, mix). Every random
draw comes from `random.Random(f"{seed}:{index}")` (string seeds hash with SHA-512, stable across runs
and platforms) and the source sample comes from a seeded permutation of the dataset, so a shard can
build any slice of the recipes on its own and get exactly what a single process would.

As the official code does, distractors come from the target's own source (coco, gqa, ...: `Sample.source`)
when it has enough images, and grid and pic-in-pic recipes skip samples whose question or answer holds
box coordinates (`[0.12, 0.34, 0.56, 0.78]`: wrong once the image is a cell of a collage); the next sample
of the permutation without any takes its place. A recipe records both (`same_source`, `skipped`).
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal, TypeVar

from core.dataset import Sample
from core.errors import UserError

Format = Literal["sequence", "grid", "pic_in_pic"]
FORMATS: tuple[str, ...] = ("sequence", "grid", "pic_in_pic")
IMAGE_COUNTS: dict[str, tuple[int, ...]] = {
    "sequence": (2, 3, 4, 5),
    "grid": (2, 3, 4, 6, 9),
    "pic_in_pic": (2,),
}
IMAGE_TOKEN = "<image>"
K = TypeVar("K")

# Variants of "For the image in the center": 9 lead-ins x 10 ways to name the inset = 90 phrases.
_PIP_LEADS = (
    "For",
    "Regarding",
    "Looking at",
    "Considering",
    "Focusing on",
    "Concerning",
    "With respect to",
    "Based on",
    "As for",
)
_PIP_NOUNS = (
    "the image in the center",
    "the picture in the center",
    "the photo in the center",
    "the central image",
    "the central picture",
    "the image in the middle",
    "the picture in the middle",
    "the smaller image in the center",
    "the inset image in the middle",
    "the image placed in the center",
)
PIP_PHRASES: tuple[str, ...] = tuple(f"{lead} {noun}" for lead in _PIP_LEADS for noun in _PIP_NOUNS)


@dataclass(frozen=True)
class SourceImage:
    """One image of a recipe: its store ref, its size (for layouts without decoding) and its sample."""

    ref: str
    width: int
    height: int
    sample_id: str


@dataclass(frozen=True)
class Recipe:
    """One augmented sample, fully determined: render it with `workers.render.render_recipe`."""

    uid: str  # stable id: f"{seed}-{index:07d}"
    index: int
    seed: int
    format: str  # one of FORMATS
    sample_id: str  # the source sample whose question/answer is used
    question: str  # the original question (no <image> token)
    answer: str  # ground truth
    images: tuple[SourceImage, ...]  # sequence/grid: display order; pic_in_pic: (background, target)
    target_index: int  # 0-based index into images of the image the question is about
    prompt: str  # the rewritten prompt, with `<image>` exactly n_prompt_images times
    phrase: str | None  # pic_in_pic phrase used, else None
    same_source: bool = True  # the distractors come from the target's source (False: it had too few images)
    skipped: int = 0  # samples with box coordinates passed over to find this grid/pic-in-pic target
    # Evaluation recipes only: per image (display order), the answer to this question about that image
    # (None where the dataset has none: the image was drawn without a sample asking the same question).
    truths: tuple[str | None, ...] | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r} is not one of {FORMATS}")
        if self.n_images not in IMAGE_COUNTS[self.format]:
            raise ValueError(
                f"{self.format} recipe with {self.n_images} images; allowed {IMAGE_COUNTS[self.format]}"
            )
        if not 0 <= self.target_index < self.n_images:
            raise ValueError(f"target_index={self.target_index} out of range for {self.n_images} images")
        if self.format == "pic_in_pic" and self.target_index != 1:
            raise ValueError(f"pic_in_pic target_index must be 1, got {self.target_index}")
        if self.prompt.count(IMAGE_TOKEN) != self.n_prompt_images:
            raise ValueError(
                f"prompt has {self.prompt.count(IMAGE_TOKEN)} image tokens, expected {self.n_prompt_images}"
            )

    @property
    def n_images(self) -> int:
        """Source images in the recipe (grid cells, sequence length, 2 for pic-in-pic)."""
        return len(self.images)

    @property
    def n_prompt_images(self) -> int:
        """Images the model is given: one collage for grid and pic-in-pic, every image for sequence."""
        return self.n_images if self.format == "sequence" else 1

    @property
    def target(self) -> SourceImage:
        return self.images[self.target_index]

    def to_dict(self) -> dict:
        return {
            "uid": self.uid,
            "index": self.index,
            "seed": self.seed,
            "format": self.format,
            "sample_id": self.sample_id,
            "question": self.question,
            "answer": self.answer,
            "images": [
                {"ref": im.ref, "width": im.width, "height": im.height, "sample_id": im.sample_id}
                for im in self.images
            ],
            "target_index": self.target_index,
            "prompt": self.prompt,
            "phrase": self.phrase,
            "same_source": self.same_source,
            "skipped": self.skipped,
            **({"truths": list(self.truths)} if self.truths is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Recipe:
        return cls(
            uid=str(d["uid"]),
            index=int(d["index"]),
            seed=int(d["seed"]),
            format=str(d["format"]),
            sample_id=str(d["sample_id"]),
            question=d["question"],
            answer=d["answer"],
            images=tuple(
                SourceImage(
                    ref=im["ref"],
                    width=int(im["width"]),
                    height=int(im["height"]),
                    sample_id=str(im["sample_id"]),
                )
                for im in d["images"]
            ),
            target_index=int(d["target_index"]),
            prompt=d["prompt"],
            phrase=d.get("phrase"),
            same_source=bool(d.get("same_source", True)),
            skipped=int(d.get("skipped", 0)),
            truths=tuple(d["truths"]) if d.get("truths") is not None else None,
        )


def _check_weights(name: str, weights: Mapping, allowed: Iterable) -> dict:
    """Validate one proportion table: known keys, finite non-negative weights, a positive total."""
    allowed = tuple(allowed)
    out = {}
    for key, value in weights.items():
        k = int(key) if isinstance(allowed[0], int) and isinstance(key, str) and key.isdigit() else key
        if k not in allowed:
            raise ValueError(f"{name}: key {key!r} is not one of {allowed}")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"{name}[{key!r}]={value!r} must be a finite number >= 0")
        out[k] = float(value)
    if not out or sum(out.values()) <= 0:
        raise ValueError(f"{name}={dict(weights)!r} needs at least one positive weight")
    return out


@dataclass(frozen=True)
class AugmentMix:
    """How often each format and image count is drawn. Weights are relative, any positive scale."""

    formats: dict[str, float] = field(
        default_factory=lambda: {"sequence": 62.0, "grid": 90.0, "pic_in_pic": 49.0},
        metadata={"help": "Relative weight of each format; default: the official mix (62k/90k/49k)."},
    )
    sequence_counts: dict[int, float] = field(
        default_factory=lambda: {2: 55.0, 3: 16.0, 4: 16.0, 5: 13.0},
        metadata={"help": "Relative weight of each sequence length (2-5 images); paper: 55/16/16/13 %."},
    )
    grid_counts: dict[int, float] = field(
        default_factory=lambda: {2: 53.0, 3: 16.0, 4: 16.0, 6: 8.0, 9: 8.0},
        metadata={"help": "Relative weight of each grid size (2, 3, 4, 6, 9 cells); paper: 53/16/16/8/8 %."},
    )

    def __post_init__(self) -> None:
        for name, allowed in (
            ("formats", FORMATS),
            ("sequence_counts", IMAGE_COUNTS["sequence"]),
            ("grid_counts", IMAGE_COUNTS["grid"]),
        ):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise ValueError(f"{name}={value!r} must be a mapping")
            object.__setattr__(self, name, _check_weights(name, value, allowed))

    def only(self, formats: Iterable[str]) -> AugmentMix:
        """The same proportions restricted to `formats`."""
        wanted = list(formats)
        for f in wanted:
            if f not in FORMATS:
                raise ValueError(f"formats: {f!r} is not one of {FORMATS}")
        return AugmentMix(
            formats={f: w for f, w in self.formats.items() if f in wanted},
            sequence_counts=dict(self.sequence_counts),
            grid_counts=dict(self.grid_counts),
        )

    def to_dict(self) -> dict:
        return {f.name: dict(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping) -> AugmentMix:
        """Inverse of `to_dict`; JSON's string keys for image counts are accepted."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown AugmentMix parameter(s): {sorted(unknown)}")
        return cls(**d)


_IMAGE_TOKEN_RE = re.compile(r"\s*" + re.escape(IMAGE_TOKEN) + r"\s*")
# A bounding box or point in normalised coordinates, as LLaVA-665k's referring data writes them.
_BOX_RE = re.compile(r"\[\s*-?\d*\.?\d+(?:\s*,\s*-?\d*\.?\d+){1,3}\s*\]")


def has_box_coordinates(text: str) -> bool:
    """Whether `text` holds coordinates like `[0.12, 0.34, 0.56, 0.78]`."""
    return _BOX_RE.search(text) is not None


def strip_image_tokens(question: str) -> str:
    """Remove every `<image>` token with the whitespace around it (inner ones become one space)."""
    return _IMAGE_TOKEN_RE.sub(" ", question).strip()


def rewrite_question(question: str) -> str:
    """The question as it follows "In Image{k}, ": no `<image>` token, first letter lower-cased."""
    q = strip_image_tokens(question)
    return q[:1].lower() + q[1:]


def build_prompt(
    format: str, n_images: int, target_index: int, question: str, phrase: str | None = None
) -> str:
    """The rewritten first-turn prompt of DESIGN 2.2 (`question` may still carry its `<image>` token).

    Args:
        format: one of FORMATS.
        n_images: source images in the recipe (only sequence prompts spell them out).
        target_index: 0-based index of the image the question is about.
        question: the original question.
        phrase: pic_in_pic only, the lead-in naming the central image.
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not one of {FORMATS}")
    if n_images not in IMAGE_COUNTS[format]:
        raise ValueError(f"n_images={n_images} not allowed for {format}; allowed {IMAGE_COUNTS[format]}")
    if not 0 <= target_index < n_images:
        raise ValueError(f"target_index={target_index} out of range for {n_images} images")
    q = rewrite_question(question)
    if format == "sequence":
        head = "".join(f"Image{i}:{IMAGE_TOKEN}\n" for i in range(1, n_images + 1))
        return f"{head}In Image{target_index + 1}, {q}"
    if format == "grid":
        return f"{IMAGE_TOKEN}\nIn Image{target_index + 1}, {q}"
    if not phrase:
        raise ValueError("phrase is required for pic_in_pic prompts")
    return f"{IMAGE_TOKEN}\n{phrase}, {q}"


class _Pool:
    """The dataset seen as distinct images: distractors are drawn over images, not samples."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        if not samples:
            raise UserError("the dataset has no samples to augment", code="dataset_empty")
        self.samples = samples
        self.images: list[SourceImage] = []
        self.position: dict[str, int] = {}
        self.by_source: dict[str | None, list[int]] = {}
        for s in samples:
            if s.image not in self.position:
                self.position[s.image] = len(self.images)
                self.by_source.setdefault(s.source, []).append(len(self.images))
                self.images.append(SourceImage(ref=s.image, width=s.width, height=s.height, sample_id=s.id))
        if len(self.images) < 2:
            raise UserError(
                f"augmentation needs at least 2 distinct images in the dataset, it has {len(self.images)}",
                code="too_few_images",
            )
        self.boxed = [has_box_coordinates(s.question) or has_box_coordinates(s.answer) for s in samples]
        # Per question text, one sample per distinct image asking it (for evaluation recipes).
        self.by_question: dict[str, list[int]] = {}
        seen: set[tuple[str, str]] = set()
        for i, s in enumerate(samples):
            if (s.question, s.image) not in seen:
                seen.add((s.question, s.image))
                self.by_question.setdefault(s.question, []).append(i)

    def same_question(self, rng: random.Random, target: Sample, k: int) -> list[Sample] | None:
        """k samples asking the target's question about k other distinct images, or None if there are fewer."""
        peers = [j for j in self.by_question.get(target.question, []) if self.samples[j].image != target.image]
        if len(peers) < k:
            return None
        return [self.samples[peers[p]] for p in rng.sample(range(len(peers)), k)]

    def distractors(
        self, rng: random.Random, target_ref: str, source: str | None, k: int
    ) -> tuple[list[SourceImage], bool]:
        """k distinct images, none of them the target's: from the target's source when it has k others,
        else from the whole dataset (drawn over the others, no rejection loop); and which of the two."""
        skip = self.position[target_ref]
        same = [i for i in self.by_source.get(source, []) if i != skip]
        if len(same) >= k:
            return [self.images[same[p]] for p in rng.sample(range(len(same)), k)], True
        picks = rng.sample(range(len(self.images) - 1), k)
        return [self.images[p + 1 if p >= skip else p] for p in picks], False


@functools.lru_cache(maxsize=8)
def _order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """Seeded permutation of the samples for one pass (recipes cycle through the dataset evenly)."""
    order = list(range(n))
    random.Random(f"{seed}:order:{epoch}").shuffle(order)
    return tuple(order)


def _weighted(rng: random.Random, weights: Mapping[K, float]) -> K:
    """One key drawn with probability proportional to its weight (keys in their given order)."""
    items = [(k, w) for k, w in weights.items() if w > 0]
    x = rng.random() * sum(w for _, w in items)
    for k, w in items:
        x -= w
        if x < 0:
            return k
    return items[-1][0]


def _recipe(pool: _Pool, index: int, seed: int, mix: AugmentMix, same_question: bool = False) -> Recipe:
    if index < 0:
        raise ValueError(f"index={index} must be >= 0")
    n = len(pool.samples)
    rng = random.Random(f"{seed}:{index}")
    fmt = _weighted(rng, mix.formats)
    position, skipped = index, 0
    if fmt != "sequence":  # the next sample of the permutation without box coordinates
        while pool.boxed[_order(n, seed, position // n)[position % n]] and skipped < n:
            position, skipped = position + 1, skipped + 1
        if skipped == n:  # every sample has boxes: this recipe becomes a sequence
            fmt, position, skipped = "sequence", index, 0
    sample = pool.samples[_order(n, seed, position // n)[position % n]]
    if fmt == "sequence":
        count = _weighted(rng, mix.sequence_counts)
    elif fmt == "grid":
        count = _weighted(rng, mix.grid_counts)
    else:
        count = 2
    if count > len(pool.images):
        # Small dataset: the largest allowed count it can fill (>= 2 is guaranteed by _Pool).
        count = max(c for c in IMAGE_COUNTS[fmt] if c <= len(pool.images))
    target = SourceImage(ref=sample.image, width=sample.width, height=sample.height, sample_id=sample.id)
    target_index = 1 if fmt == "pic_in_pic" else rng.randrange(count)
    truths: tuple[str | None, ...] | None = None
    peers = pool.same_question(rng, sample, count - 1) if same_question else None
    if peers is not None:  # every image has a truth for the question
        others = [SourceImage(ref=s.image, width=s.width, height=s.height, sample_id=s.id) for s in peers]
        same_source = all(s.source == sample.source for s in peers)
        answers: list[str | None] = [s.answer for s in peers]
        truths = (*answers[:target_index], sample.answer, *answers[target_index:])
    else:
        others, same_source = pool.distractors(rng, sample.image, sample.source, count - 1)
        if same_question:
            truths = tuple(sample.answer if k == target_index else None for k in range(count))
    images = (*others[:target_index], target, *others[target_index:])
    phrase = rng.choice(PIP_PHRASES) if fmt == "pic_in_pic" else None
    return Recipe(
        uid=f"{seed}-{index:07d}",
        index=index,
        seed=seed,
        format=fmt,
        sample_id=sample.id,
        question=strip_image_tokens(sample.question),
        answer=sample.answer,
        images=images,
        target_index=target_index,
        prompt=build_prompt(fmt, count, target_index, sample.question, phrase),
        phrase=phrase,
        same_source=same_source,
        skipped=skipped,
        truths=truths,
    )


def make_recipe(samples: Sequence[Sample], index: int, seed: int, mix: AugmentMix) -> Recipe:
    """Recipe number `index` of the pair set with this seed (same inputs, same recipe).

    Raises:
        UserError: the dataset has fewer than 2 distinct images.
    """
    return _recipe(_Pool(samples), index, seed, mix)


def make_recipes(
    samples: Sequence[Sample],
    num: int,
    seed: int,
    mix: AugmentMix = AugmentMix(),
    start: int = 0,
    same_question: bool = False,
) -> list[Recipe]:
    """Recipes `start .. start+num-1`; any slicing into shards gives the same recipes as one call.

    Args:
        samples: the dataset; a sample is the source of recipe i in a seeded order, cycling when
            num exceeds the dataset.
        num: how many recipes.
        seed: the pair set's seed.
        mix: format and image-count proportions.
        start: index of the first recipe.
        same_question: evaluation recipes: distractors from samples asking the same question where the
            dataset has enough of them, and every image's answer in `Recipe.truths`.

    Raises:
        UserError: the dataset has fewer than 2 distinct images.
    """
    if num < 0 or start < 0:
        raise ValueError(f"num={num} and start={start} must be >= 0")
    pool = _Pool(samples)
    return [_recipe(pool, i, seed, mix, same_question) for i in range(start, start + num)]
