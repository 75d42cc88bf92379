"""Pair-set records: status and stage, shard progress, final counts, cancel."""

from __future__ import annotations

from typing import Any

from redis import Redis

from core.records import sharded
from core.records.base import (
    PAIRSET,
    Record,
    new_id,
    now,
)


def new_pairset(owner: str, *, dataset_id: str, model: str, config: dict[str, Any]) -> Record:
    """A queued pair-set record; `config` is the validated create request."""
    return {
        "id": new_id(PAIRSET),
        "object": "pairset",
        "dataset_id": dataset_id,
        "model": model,
        "status": "queued",
        "stage": None,
        "progress": {"done": 0, "total": 0},
        "counts": {
            "prompts": 0,
            "candidates": 0,
            "hallucinated": 0,
            "pairs": 0,
            "distractors_from_source": 0,
            "box_samples_skipped": 0,
            "removed": {"perplexity": 0, "length_ratio": 0, "edit_distance": 0, "perplexity_gate": 0},
        },
        "error": None,
        "config": config,
        "created_at": now(),
        "started_at": None,
        "finished_at": None,
        "owner": owner,
    }


def set_pairset_status(
    r: Redis,
    pairset_id: str,
    status: str,
    *,
    stage: str | None = None,
    error: dict[str, str] | None = None,
    allowed_from: tuple[str, ...] = ("queued", "running"),
) -> Record:
    """Move a pair set to `status` if it is in one of `allowed_from` (a terminal one never changes again)."""
    return sharded.set_status(r, PAIRSET, pairset_id, status, stage=stage, error=error, allowed_from=allowed_from)


def start_pairset(r: Redis, pairset_id: str, *, total: int, num_shards: int) -> Record:
    """`queued` -> `running` in stage `generate` with progress {0, total} (`sharded.start`)."""
    return sharded.start(r, PAIRSET, pairset_id, total=total, num_shards=num_shards)


def set_pairset_stage(r: Redis, pairset_id: str, stage: str, **fields: Any) -> Record:
    """Move a running pair set to `stage` (and set `fields`), with a `stage` event; else leave it alone."""
    return sharded.set_stage(r, PAIRSET, pairset_id, stage, **fields)


def report_shard_progress(r: Redis, pairset_id: str, shard: int, done: int, *, event_every_s: float = 2.0) -> Record:
    """Shard `shard` of a pair set has finished `done` of its prompts (`sharded.report_shard_progress`)."""
    return sharded.report_shard_progress(r, PAIRSET, pairset_id, shard, done, event_every_s=event_every_s)


shard_progress = sharded.shard_progress


def finish_pairset(r: Redis, pairset_id: str, counts: dict[str, Any]) -> Record:
    """A running pair set `succeeded` in stage `done` with its final counts (left alone if it was cancelled)."""
    return sharded.finish(r, PAIRSET, pairset_id, counts=counts)


def request_cancel(r: Redis, pairset_id: str, owner: str) -> Record:
    """Raise the cancel flag and mark the pair set `cancelled` at once (`sharded.request_cancel`)."""
    return sharded.request_cancel(r, PAIRSET, pairset_id, owner, what="pair set")
