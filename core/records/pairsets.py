"""Pair-set records: status and stage, shard progress, final counts, cancel."""

from __future__ import annotations

from typing import Any

from redis import Redis

from core.errors import ConflictError
from core.records.base import (
    CANCEL_TTL_S,
    PAIRSET,
    PAIRSET_STATUSES,
    PAIRSET_TERMINAL,
    Record,
    append_event,
    cancel_key,
    get,
    new_id,
    now,
    progress_event_key,
    progress_key,
    update,
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
    if status not in PAIRSET_STATUSES:
        raise ValueError(f"status must be one of {PAIRSET_STATUSES}, got {status!r}")

    def mutate(rec: Record) -> Record | None:
        if rec["status"] not in allowed_from or rec["status"] == status:
            return None
        rec["status"] = status
        if stage is not None:
            rec["stage"] = stage
        if error is not None:
            rec["error"] = error
        if status == "running" and rec.get("started_at") is None:
            rec["started_at"] = now()
        if status in PAIRSET_TERMINAL:
            rec["finished_at"] = now()
        return rec

    def event(rec: Record) -> tuple[str, dict[str, Any]]:
        return "status", {"status": rec["status"], "stage": rec["stage"], "error": rec["error"]}

    return update(r, PAIRSET, pairset_id, mutate, event=event)


def start_pairset(r: Redis, pairset_id: str, *, total: int, num_shards: int) -> Record:
    """`queued` -> `running` in stage `generate` with progress {0, total}; the record keeps `num_shards`
    (not shown by the API) for `core.jobs.stop_pairset`. A re-run on a running pair set keeps its progress;
    one that has finished (cancelled in the meantime) is left alone."""

    def mutate(rec: Record) -> Record | None:
        if rec["status"] == "running" and rec.get("num_shards") == num_shards:
            return None
        if rec["status"] not in ("queued", "running"):
            return None
        if rec["status"] == "queued":
            rec.update(status="running", stage="generate", progress={"done": 0, "total": total}, started_at=now())
        rec["num_shards"] = num_shards
        return rec

    def event(rec: Record) -> tuple[str, dict[str, Any]]:
        return "status", {"status": rec["status"], "stage": rec["stage"], "error": rec["error"]}

    return update(r, PAIRSET, pairset_id, mutate, event=event)


def set_pairset_stage(r: Redis, pairset_id: str, stage: str, **fields: Any) -> Record:
    """Move a running pair set to `stage` (and set `fields`), with a `stage` event; else leave it alone."""

    def mutate(rec: Record) -> Record | None:
        if rec["status"] != "running":
            return None
        rec.update(stage=stage, **fields)
        return rec

    return update(r, PAIRSET, pairset_id, mutate, event=lambda rec: ("stage", {"stage": rec["stage"]}))


def report_shard_progress(r: Redis, pairset_id: str, shard: int, done: int, *, event_every_s: float = 2.0) -> Record:
    """Shard `shard` has finished `done` of its prompts: update `progress.done`; return the record.

    Each shard's count is a field of one hash, overwritten (HSET), never added to: a shard re-run after
    its worker died counts its prompts once. `progress.done` is the sum over shards, written under
    WATCH and never lowered, so shard jobs on different workers cannot undo each other's updates; a
    pair set that is no longer running is not touched (the caller sees its status and stops). At most
    one `progress` event per `event_every_s`, whichever shard reports.
    """
    key = progress_key(pairset_id)
    with r.pipeline() as pipe:
        pipe.hset(key, str(shard), done)
        pipe.expire(key, CANCEL_TTL_S)
        pipe.hvals(key)
        total_done = sum(int(v) for v in pipe.execute()[-1])

    def mutate(rec: Record) -> Record | None:
        if rec["status"] != "running" or total_done <= rec["progress"]["done"]:
            return None
        rec["progress"] = {**rec["progress"], "done": total_done}
        return rec

    rec = update(r, PAIRSET, pairset_id, mutate)
    if rec["status"] == "running" and r.set(progress_event_key(pairset_id), 1, nx=True, px=int(event_every_s * 1000)):
        append_event(r, pairset_id, "progress", dict(rec["progress"]))
    return rec


def shard_progress(r: Redis, pairset_id: str) -> dict[int, int]:
    """Prompts done per shard index, as the shard jobs last reported them."""
    raw: dict[Any, Any] = r.hgetall(progress_key(pairset_id))
    return {int(k): int(v) for k, v in raw.items()}


def finish_pairset(r: Redis, pairset_id: str, counts: dict[str, Any]) -> Record:
    """A running pair set `succeeded` in stage `done` with its final counts (left alone if it was cancelled)."""

    def mutate(rec: Record) -> Record | None:
        if rec["status"] != "running":
            return None
        rec.update(status="succeeded", stage="done", counts=counts, finished_at=now())
        rec["progress"] = {**rec["progress"], "done": rec["progress"]["total"]}
        return rec

    def event(rec: Record) -> tuple[str, dict[str, Any]]:
        return "status", {"status": rec["status"], "stage": rec["stage"], "error": rec["error"], "counts": rec["counts"]}

    return update(r, PAIRSET, pairset_id, mutate, event=event)


def request_cancel(r: Redis, pairset_id: str, owner: str) -> Record:
    """Raise the cancel flag and mark the pair set `cancelled` at once (queued or running).

    ConflictError when it has already finished. Its jobs are stopped by `core.jobs.stop_pairset`; a
    running shard job sees the flag (or the status) at its next batch and stops without a retry, and
    its progress is no longer recorded.
    """
    rec = get(r, PAIRSET, pairset_id, owner)
    if rec["status"] in PAIRSET_TERMINAL:
        raise ConflictError(
            f"pair set {pairset_id} is already {rec['status']}", code="pairset_finished", param="id"
        )
    r.set(cancel_key(pairset_id), "1", ex=CANCEL_TTL_S)
    append_event(r, pairset_id, "cancel_requested", {})
    return set_pairset_status(r, pairset_id, "cancelled")


