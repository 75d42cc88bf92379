"""An evaluation's files in the artifact store, and reading its per-sample records without the pipeline.

    evaluations/{id}/shards/{i:05d}.jsonl   one shard job's records (workers.evaluate.evaluate_shard)
    evaluations/{id}/samples.jsonl          every record in prompt order, written by the merge

Only the standard library is needed here: the API pages the records without importing the workers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.store import ArtifactStore

# What a page of per-sample records shows (the rest, e.g. the recipe, stays in the file).
SAMPLE_FIELDS = (
    "uid", "sample_id", "format", "n_images", "target_index", "prompt", "answer", "truth", "truths",
    "correct", "confused_with", "ratios", "single",
)  # fmt: skip


def evaluation_dir(store: ArtifactStore, evaluation_id: str) -> Path:
    return store.path("evaluations", evaluation_id)


def shard_path(store: ArtifactStore, evaluation_id: str, index: int) -> Path:
    return evaluation_dir(store, evaluation_id) / "shards" / f"{index:05d}.jsonl"


def samples_path(store: ArtifactStore, evaluation_id: str) -> Path:
    return evaluation_dir(store, evaluation_id) / "samples.jsonl"


def samples_page(path: Path, *, limit: int, after: str | None = None) -> tuple[list[dict[str, Any]], bool]:
    """Records after the uid `after` (uids sort in prompt order), at most `limit`, and whether there are more."""
    page: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            record = json.loads(line)
            if after is not None and record["uid"] <= after:
                continue
            if len(page) == limit:
                return page, True
            page.append({k: record.get(k) for k in SAMPLE_FIELDS})
    return page, False
