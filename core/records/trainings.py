"""Training records: status, step progress and metrics, checkpoints, adapter, cancel; the link from a pair set's `train`."""

from __future__ import annotations

import math
from typing import Any

from redis import Redis

from core.errors import ConflictError
from core.records.base import (
    CANCEL_TTL_S,
    PAIRSET,
    TRAINING,
    TRAINING_STATUSES,
    TRAINING_TERMINAL,
    Record,
    append_event,
    cancel_key,
    get,
    new_id,
    now,
    update,
)


def new_training(
    owner: str,
    *,
    pairset_id: str,
    model: str,
    hyperparameters: dict[str, Any],
    checkpoint_every: int,
    training_id: str | None = None,
    preset: str = "paper",
    evaluation: dict[str, Any] | None = None,
) -> Record:
    """A queued training record; `hyperparameters` is the full set (defaults filled in)."""
    return {
        "id": training_id or new_id(TRAINING),
        "object": "training",
        "pairset_id": pairset_id,
        "model": model,
        "preset": preset,
        "hyperparameters": hyperparameters,
        "checkpoint_every": checkpoint_every,
        "status": "queued",
        "progress": {"step": 0, "total_steps": hyperparameters.get("max_steps") or 0},
        "metrics": {},
        "checkpoints": {"count": 0, "last_step": None},
        "adapter": None,
        # What `evaluation` asked for; once the training has succeeded, its base-model and adapter evaluations.
        "evaluation": {"request": evaluation, "base": None, "adapter": None} if evaluation else None,
        "error": None,
        "created_at": now(),
        "started_at": None,
        "finished_at": None,
        "owner": owner,
    }


def _training_status(rec: Record) -> tuple[str, dict[str, Any]]:
    return "status", {"status": rec["status"], "progress": rec["progress"], "error": rec["error"]}


def set_training_status(
    r: Redis,
    training_id: str,
    status: str,
    *,
    error: dict[str, str] | None = None,
    allowed_from: tuple[str, ...] = ("queued", "running"),
) -> Record:
    """Move a training to `status` if it is in one of `allowed_from` (a terminal one never changes again)."""
    if status not in TRAINING_STATUSES:
        raise ValueError(f"status must be one of {TRAINING_STATUSES}, got {status!r}")

    def mutate(rec: Record) -> Record | None:
        if rec["status"] not in allowed_from or rec["status"] == status:
            return None
        rec["status"] = status
        if error is not None:
            rec["error"] = error
        if status == "running" and rec.get("started_at") is None:
            rec["started_at"] = now()
        if status in TRAINING_TERMINAL:
            rec["finished_at"] = now()
        return rec

    return update(r, TRAINING, training_id, mutate, event=_training_status)


def start_training(r: Redis, training_id: str, *, step: int) -> Record:
    """A training job begins: `queued` -> `running`, at `step` (0, or the checkpoint it resumes from).

    A re-run of a running training (its worker died) goes back to the step of the checkpoint it resumes
    from, with a `resumed` event: the steps after it are done again. A finished training is left alone.
    """
    before: list[str] = []

    def mutate(rec: Record) -> Record | None:
        before[:] = [rec["status"]]
        if rec["status"] not in ("queued", "running"):
            return None
        if rec["status"] == "queued":
            rec.update(status="running", started_at=now())
        rec["progress"] = {**rec["progress"], "step": step}
        return rec

    def event(rec: Record) -> tuple[str, dict[str, Any]]:
        return _training_status(rec) if before == ["queued"] else ("resumed", {"step": step})

    return update(r, TRAINING, training_id, mutate, event=event)


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    """JSON has no NaN or infinity: such a metric (a diverged loss) is left out."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


def report_training_step(
    r: Redis, training_id: str, *, step: int, total_steps: int, metrics: dict[str, Any], event: dict[str, Any] | None = None
) -> Record:
    """A running training finished optimizer step `step`: its progress and latest metrics; with `event`
    (extra data), a `step` event in the same write. A training that is no longer running is not touched."""

    def mutate(rec: Record) -> Record | None:
        if rec["status"] != "running":
            return None
        rec.update(progress={"step": step, "total_steps": total_steps}, metrics=_finite(metrics))
        return rec

    def step_event(rec: Record) -> tuple[str, dict[str, Any]]:
        return "step", {**(event or {}), **rec["progress"], "metrics": rec["metrics"]}

    return update(r, TRAINING, training_id, mutate, event=step_event if event is not None else None)


def report_training_checkpoint(r: Redis, training_id: str, *, step: int, count: int, metrics: dict[str, Any]) -> Record:
    """A complete checkpoint of `step` is in the store (`count` of them now), with a `checkpoint` event.
    Also recorded for a cancelled training (a cancel saves the step it stopped at), without an event: the
    terminal `status` event stays the last one of the stream."""

    def mutate(rec: Record) -> Record | None:
        if rec["status"] not in ("running", "cancelled"):
            return None
        rec["checkpoints"] = {"count": count, "last_step": step}
        return rec

    def event(rec: Record) -> tuple[str, dict[str, Any]] | None:
        if rec["status"] != "running":
            return None
        return "checkpoint", {"step": step, "metrics": _finite(metrics)}

    return update(r, TRAINING, training_id, mutate, event=event)


def finish_training(
    r: Redis, training_id: str, *, step: int, total_steps: int, metrics: dict[str, Any], adapter: dict[str, Any]
) -> Record:
    """A running training `succeeded`: its last step, final metrics and adapter {size_bytes, url}."""

    def mutate(rec: Record) -> Record | None:
        if rec["status"] != "running":
            return None
        rec.update(
            status="succeeded",
            progress={"step": step, "total_steps": total_steps},
            adapter=adapter,
            finished_at=now(),
        )
        if metrics:
            rec["metrics"] = _finite(metrics)
        return rec

    return update(r, TRAINING, training_id, mutate, event=_training_status)


def request_training_cancel(r: Redis, training_id: str, owner: str) -> Record:
    """Raise the cancel flag and mark the training `cancelled` at once (queued or running).

    ConflictError when it has already finished. A queued job is dropped (`core.jobs.stop_training`); a
    running one sees the flag after its current optimizer step, saves a checkpoint of it and stops.
    """
    rec = get(r, TRAINING, training_id, owner)
    if rec["status"] in TRAINING_TERMINAL:
        raise ConflictError(
            f"training {training_id} is already {rec['status']}", code="training_finished", param="id"
        )
    r.set(cancel_key(training_id), "1", ex=CANCEL_TTL_S)
    append_event(r, training_id, "cancel_requested", {})
    return set_training_status(r, training_id, "cancelled")


def link_training(r: Redis, pairset_id: str, training_id: str) -> str:
    """Record `training_id` as the training a pair set's `train` started, unless it has one already;
    return the one it has now (so a re-run of the job that chains the training never starts two)."""

    def mutate(rec: Record) -> Record | None:
        if rec.get("training_id"):
            return None
        rec["training_id"] = training_id
        return rec

    return str(update(r, PAIRSET, pairset_id, mutate)["training_id"])

