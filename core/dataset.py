"""The normalised dataset: what ingestion writes and every later stage reads.

On disk (under the artifact store): `datasets/{id}/samples.jsonl` (one `Sample` per line) and
`datasets/{id}/manifest.json` (counts and the per-row problems). Images live in the store's
content-addressed image area; a sample refers to its image by sha256 ref and records its size so
layouts can be computed without decoding pixels.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.store import ArtifactStore, atomic_writer


@dataclass(frozen=True)
class Sample:
    """One usable single-image instruction sample (first question/answer turn only)."""

    id: str
    image: str  # sha256 ref in the artifact store
    width: int  # after EXIF orientation
    height: int
    question: str  # without the `<image>` token
    answer: str
    # The subset the sample comes from (coco, gqa, ocr_vqa, ...): a `source` column, else the first folder of
    # its image path. Distractors are drawn from the same source, as the official code does.
    source: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> Sample:
        return cls(
            id=str(d["id"]),
            image=d["image"],
            width=int(d["width"]),
            height=int(d["height"]),
            question=d["question"],
            answer=d["answer"],
            source=d.get("source"),
        )


@dataclass(frozen=True)
class Problem:
    """A row that could not be used, and why. `row` is the 0-based position in the source file."""

    row: int | None
    id: str | None
    code: str  # machine-readable: missing_image, unreadable_image, empty_answer, ...
    reason: str  # human-readable

    @classmethod
    def from_dict(cls, d: dict) -> Problem:
        return cls(row=d.get("row"), id=d.get("id"), code=d["code"], reason=d["reason"])


@dataclass
class Manifest:
    """Counts and problems of one ingested dataset."""

    dataset_id: str
    source_format: str  # llava | jsonl | parquet
    num_rows: int  # rows read from the source
    num_samples: int  # usable samples written
    num_images: int  # distinct images stored
    problems: list[Problem] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        return cls(
            dataset_id=d["dataset_id"],
            source_format=d["source_format"],
            num_rows=d["num_rows"],
            num_samples=d["num_samples"],
            num_images=d["num_images"],
            problems=[Problem.from_dict(p) for p in d.get("problems", [])],
        )


def dataset_dir(store: ArtifactStore, dataset_id: str) -> Path:
    return store.path("datasets", dataset_id)


def write_dataset(store: ArtifactStore, manifest: Manifest, samples: Iterable[Sample]) -> None:
    """Write samples then manifest, each atomically; the manifest's presence marks the dataset complete."""
    folder = dataset_dir(store, manifest.dataset_id)
    with atomic_writer(folder / "samples.jsonl", "w") as fh:
        for s in samples:
            fh.write(json.dumps(asdict(s), ensure_ascii=False) + "\n")
    with atomic_writer(folder / "manifest.json", "w") as fh:
        json.dump(manifest.to_dict(), fh, ensure_ascii=False, indent=1)


def read_manifest(store: ArtifactStore, dataset_id: str) -> Manifest:
    with open(dataset_dir(store, dataset_id) / "manifest.json", encoding="utf-8") as fh:
        return Manifest.from_dict(json.load(fh))


def iter_samples(store: ArtifactStore, dataset_id: str) -> Iterator[Sample]:
    with open(dataset_dir(store, dataset_id) / "samples.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield Sample.from_dict(json.loads(line))


def read_samples(store: ArtifactStore, dataset_id: str) -> list[Sample]:
    return list(iter_samples(store, dataset_id))
