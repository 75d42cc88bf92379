"""Records of sharded jobs (pair sets, evaluations): status and stage, per-shard progress, final fields, cancel.

A sharded job is a start job, N shard jobs (gpu) and a merge job (cpu); its record moves queued -> running
(stage by stage) -> succeeded | failed | cancelled, and a terminal status never changes again.
"""

from __future__ import annotations

from typing import Any

from redis import Redis

from core.errors import ConflictError
from core.records.base import (
    CANCEL_TTL_S,
    Record,
    append_event,
    cancel_key,
    get,
    now,
    progress_event_key,
    progress_key,
    update,
)

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


def set_status(
    r: Redis,
    kind: str,
    resource_id: str,
    status: str,
    *,
    stage: str | None = None,
    error: dict[str, str] | None = None,
    allowed_from: tuple[str, ...] = ("queued", "running"),
) -> Record:
    """Move a sharded job to `status` if it is in one of `allowed_from` (a terminal one never changes again)."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")

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
        if status in TERMINAL_STATUSES:
            rec["finished_at"] = now()
        return rec

    def event(rec: Record) -> tuple[str, dict[str, Any]]:
        return "status", {"status": rec["status"], "stage": rec["stage"], "error": rec["error"]}

    return update(r, kind, resource_id, mutate, event=event)


def start(r: Redis, kind: str, resource_id: str, *, total: int, num_shards: int) -> Record:
    """`queued` -> `running` in stage `generate` with progress {0, total}; the record keeps `num_shards`
    (not shown by the API) for stopping its jobs. A re-run on a running one keeps its progress;
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

    return update(r, kind, resource_id, mutate, event=event)


def set_stage(r: Redis, kind: str, resource_id: str, stage: str, **fields: Any) -> Record:
    """Move a running job to `stage` (and set `fields`), with a `stage` event; else leave it alone."""

    def mutate(rec: Record) -> Record | None:
        if rec["status"] != "running":
            return None
        rec.update(stage=stage, **fields)
        return rec

    return update(r, kind, resource_id, mutate, event=lambda rec: ("stage", {"stage": rec["stage"]}))


def report_shard_progress(
    r: Redis, kind: str, resource_id: str, shard: int, done: int, *, event_every_s: float = 2.0
) -> Record:
    """Shard `shard` has finished `done` of its prompts: update `progress.done`; return the record.

    Each shard's count is a field of one hash, overwritten (HSET), never added to: a shard re-run after
    its worker died counts its prompts once. `progress.done` is the sum over shards, written under
    WATCH and never lowered, so shard jobs on different workers cannot undo each other's updates; a
    job that is no longer running is not touched (the caller sees its status and stops). At most
    one `progress` event per `event_every_s`, whichever shard reports.
    """
    key = progress_key(resource_id)
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

    rec = update(r, kind, resource_id, mutate)
    if rec["status"] == "running" and r.set(progress_event_key(resource_id), 1, nx=True, px=int(event_every_s * 1000)):
        append_event(r, resource_id, "progress", dict(rec["progress"]))
    return rec


def shard_progress(r: Redis, resource_id: str) -> dict[int, int]:
    """Prompts done per shard index, as the shard jobs last reported them."""
    raw: dict[Any, Any] = r.hgetall(progress_key(resource_id))
    return {int(k): int(v) for k, v in raw.items()}


def finish(r: Redis, kind: str, resource_id: str, **fields: Any) -> Record:
    """A running job `succeeded` in stage `done` with its final `fields` (left alone if it was cancelled);
    the status event carries them."""

    def mutate(rec: Record) -> Record | None:
        if rec["status"] != "running":
            return None
        rec.update(status="succeeded", stage="done", finished_at=now(), **fields)
        rec["progress"] = {**rec["progress"], "done": rec["progress"]["total"]}
        return rec

    def event(rec: Record) -> tuple[str, dict[str, Any]]:
        return "status", {"status": rec["status"], "stage": rec["stage"], "error": rec["error"], **{k: rec[k] for k in fields}}

    return update(r, kind, resource_id, mutate, event=event)


def request_cancel(r: Redis, kind: str, resource_id: str, owner: str, *, what: str) -> Record:
    """Raise the cancel flag and mark the job `cancelled` at once (queued or running).

    ConflictError when it has already finished. Its jobs are stopped by `core.jobs`; a running shard job
    sees the flag (or the status) at its next batch and stops without a retry, and its progress is no
    longer recorded. `what` names the resource in the error ("pair set", "evaluation").
    """
    rec = get(r, kind, resource_id, owner)
    if rec["status"] in TERMINAL_STATUSES:
        raise ConflictError(f"{what} {resource_id} is already {rec['status']}", code=f"{kind}_finished", param="id")
    r.set(cancel_key(resource_id), "1", ex=CANCEL_TTL_S)
    append_event(r, resource_id, "cancel_requested", {})
    return set_status(r, kind, resource_id, "cancelled")


