"""Evaluation records: a sharded job (`sharded`) that scores a model, or a training's adapter, on a dataset.

A training created with `evaluation` gets two of them when it succeeds (the base model and its adapter);
each, when it finishes, writes its result into the training's `evaluation` so that the training shows
both side by side.
"""

from __future__ import annotations

from typing import Any

from redis import Redis

from core.records import sharded
from core.records.base import EVALUATION, TRAINING, Record, new_id, now, update


def new_evaluation(
    owner: str,
    *,
    model: str,
    dataset_id: str,
    config: dict[str, Any],
    training_id: str | None = None,
    report_to: tuple[str, str] | None = None,
) -> Record:
    """A queued evaluation record; `config` is the validated create request (defaults filled in).

    `training_id`: evaluate that training's adapter on `model`. `report_to`: (training id, "base" or
    "adapter") when it is part of a training's own evaluation, whose record it reports to.
    """
    return {
        "id": new_id(EVALUATION),
        "object": "evaluation",
        "model": model,
        "training_id": training_id,
        "dataset_id": dataset_id,
        "status": "queued",
        "stage": None,
        "progress": {"done": 0, "total": 0},
        "result": None,
        "error": None,
        "config": config,
        "report_to": {"training_id": report_to[0], "role": report_to[1]} if report_to else None,
        "created_at": now(),
        "started_at": None,
        "finished_at": None,
        "owner": owner,
    }


def set_evaluation_status(r: Redis, evaluation_id: str, status: str, **kwargs: Any) -> Record:
    return sharded.set_status(r, EVALUATION, evaluation_id, status, **kwargs)


def start_evaluation(r: Redis, evaluation_id: str, *, total: int, num_shards: int) -> Record:
    return sharded.start(r, EVALUATION, evaluation_id, total=total, num_shards=num_shards)


def set_evaluation_stage(r: Redis, evaluation_id: str, stage: str) -> Record:
    return sharded.set_stage(r, EVALUATION, evaluation_id, stage)


def report_evaluation_progress(r: Redis, evaluation_id: str, shard: int, done: int, *, event_every_s: float = 2.0) -> Record:
    return sharded.report_shard_progress(r, EVALUATION, evaluation_id, shard, done, event_every_s=event_every_s)


def finish_evaluation(r: Redis, evaluation_id: str, result: dict[str, Any]) -> Record:
    return sharded.finish(r, EVALUATION, evaluation_id, result=result)


def request_evaluation_cancel(r: Redis, evaluation_id: str, owner: str) -> Record:
    return sharded.request_cancel(r, EVALUATION, evaluation_id, owner, what="evaluation")


def link_evaluations(r: Redis, training_id: str, ids: dict[str, str]) -> dict[str, str]:
    """Record a training's own evaluations ({"base": id, "adapter": id}) in its `evaluation` unless it has
    them already; return the ids it has (so a re-run of the job that creates them never creates two)."""

    def mutate(rec: Record) -> Record | None:
        evaluation = rec.get("evaluation")
        if evaluation is None:
            raise ValueError(f"training {training_id} asked for no evaluation")
        if evaluation.get("base") is not None:
            return None
        rec["evaluation"] = {
            **evaluation,
            **{role: {"id": eid, "status": "queued", "result": None} for role, eid in ids.items()},
        }
        return rec

    evaluation = update(r, TRAINING, training_id, mutate)["evaluation"]
    return {role: evaluation[role]["id"] for role in ids}


def report_to_training(r: Redis, training_id: str, role: str, evaluation: Record) -> Record:
    """Copy an evaluation's status and result into its training's `evaluation[role]`."""

    def mutate(rec: Record) -> Record | None:
        entry = (rec.get("evaluation") or {}).get(role)
        if not entry or entry["id"] != evaluation["id"]:
            return None
        rec["evaluation"] = {
            **rec["evaluation"],
            role: {"id": evaluation["id"], "status": evaluation["status"], "result": evaluation["result"]},
        }
        return rec

    return update(r, TRAINING, training_id, mutate)
