"""A pair set's prompts, every one of them, paged with filters: the index the merge writes, and reading it.

The shard records (`pairsets/{id}/shards/*.jsonl`) hold everything about a prompt: its recipe, every
candidate with its ratio, verdict and per-image-token attention, the rejected index and the pair's
statistics. What they lack is the post-selection outcome, and a way to find the n-th grid prompt without
reading them all. The merge reads every record anyway; as it does, it writes one fixed-size row per prompt
(`pairsets/{id}/prompts.npy`): the recipe index, where the record lies (shard, byte offset, length), and
what the filters look at (format, image count, outcome). A page is then a numpy mask over that array
(100k prompts: 2.4 MB, memory-mapped) and one seek + read per prompt shown: no page loads the pair set.

Only numpy here (no pipeline import): the API reads it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.store import ArtifactStore, atomic_writer

FORMATS = ("sequence", "grid", "pic_in_pic")
# What happened to a prompt: exported as a pair; no rejected answer found; only the perplexity gate stood
# in the way; or the post-selection filter that removed its pair (workers.pipeline._outcome).
OUTCOMES = ("exported", "no_pair", "perplexity_gate", "perplexity", "length_ratio", "edit_distance")

DTYPE = np.dtype(
    [
        ("index", "<u4"),  # the recipe index: uid `{seed}-{index:07d}`, increasing in merge order
        ("shard", "<u2"),
        ("offset", "<u8"),
        ("length", "<u4"),
        ("format", "u1"),
        ("n_images", "u1"),
        ("outcome", "u1"),
        ("hallucinated", "u1"),  # candidates judged hallucinated
    ]
)


def index_path(store: ArtifactStore, pairset_id: str) -> Path:
    return store.path("pairsets", pairset_id, "prompts.npy")


def uid_index(uid: str) -> int:
    """The recipe index of a uid `{seed}-{index}`."""
    return int(uid.rsplit("-", 1)[1])


def iter_records(paths: Iterable[Path]) -> Iterable[tuple[int, int, int, dict[str, Any]]]:
    """(shard, byte offset, byte length, record) of every line of the shard files, in order."""
    for shard, path in enumerate(paths):
        offset = 0
        with open(path, "rb") as fh:
            for line in fh:
                if line.strip():
                    yield shard, offset, len(line), json.loads(line)
                offset += len(line)


class IndexWriter:
    """Collects one row per prompt (in merge order) and writes the index atomically."""

    def __init__(self) -> None:
        self._rows: list[tuple[int, ...]] = []

    def add(self, shard: int, offset: int, length: int, record: dict[str, Any], outcome: str) -> None:
        recipe = record["recipe"]
        self._rows.append(
            (
                uid_index(record["uid"]),
                shard,
                offset,
                length,
                FORMATS.index(recipe["format"]),
                len(recipe["images"]),
                OUTCOMES.index(outcome),
                sum(bool(c["hallucinated"]) for c in record["candidates"]),
            )
        )

    def write(self, path: Path) -> None:
        with atomic_writer(path) as fh:
            np.save(fh, np.array(self._rows, dtype=DTYPE))


@dataclass(frozen=True)
class Filters:
    """Which prompts a page shows; None: any."""

    format: str | None = None
    n_images: int | None = None
    outcome: str | None = None


class NoIndex(FileNotFoundError):
    """The pair set has no prompt index (it has not merged, or merged before the index existed)."""


def load_index(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise NoIndex(path) from None


def _mask(index: np.ndarray, filters: Filters) -> np.ndarray | None:
    mask = None
    for name, value in (
        ("format", None if filters.format is None else FORMATS.index(filters.format)),
        ("n_images", filters.n_images),
        ("outcome", None if filters.outcome is None else OUTCOMES.index(filters.outcome)),
    ):
        if value is not None:
            m = index[name] == value
            mask = m if mask is None else mask & m
    return mask


def page(index: np.ndarray, filters: Filters, *, limit: int, after: str | None = None) -> tuple[np.ndarray, bool, int]:
    """The rows of up to `limit` prompts matching `filters` after the uid `after`, has_more, and how many
    prompts match in all."""
    start = 0 if after is None else int(np.searchsorted(index["index"], uid_index(after), side="right"))
    mask = _mask(index, filters)
    if mask is None:
        rows = np.arange(start, min(start + limit + 1, len(index)))
        total = len(index)
    else:
        hits = np.flatnonzero(mask[start:])
        rows = hits[: limit + 1] + start
        total = int(mask.sum())
    return index[rows[:limit]], len(rows) > limit, total


def find(index: np.ndarray, uid: str) -> np.void | None:
    """The row of one prompt, or None."""
    i = uid_index(uid)
    pos = int(np.searchsorted(index["index"], i))
    if pos < len(index) and int(index["index"][pos]) == i:
        return index[pos]
    return None


def read_record(shards_dir: Path, row: np.void) -> dict[str, Any]:
    """The shard record of one index row (one seek and one read)."""
    with open(shards_dir / f"{int(row['shard']):05d}.jsonl", "rb") as fh:
        fh.seek(int(row["offset"]))
        return json.loads(fh.read(int(row["length"])))


def counts(index: np.ndarray) -> dict[str, dict[str, int]]:
    """Prompts per format, image count and outcome (for the filter menus)."""
    out: dict[str, dict[str, int]] = {}
    for name, labels in (("format", FORMATS), ("outcome", OUTCOMES)):
        values = np.bincount(index[name], minlength=len(labels))
        out[name] = {label: int(v) for label, v in zip(labels, values, strict=False) if v}
    n = np.bincount(index["n_images"])
    out["n_images"] = {str(k): int(v) for k, v in enumerate(n) if v}
    return out


def decode_attention(text: str) -> np.ndarray:
    """A candidate's stored attention (`workers.pipeline.encode_attention`: base64 of little-endian fp16)."""
    return np.frombuffer(base64.b64decode(text), dtype="<f2").astype(np.float64)
