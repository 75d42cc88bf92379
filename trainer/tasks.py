"""The RQ entry point of a training (DESIGN 2.7, 3.3): a training id in, an adapter out.

    training-{id}   train   run_training_job: DPO + LoRA on the pair set's export

Enqueued only by `core.jobs` (`enqueue_training`, `enqueue_training_for_pairset`); run by `miadpo
trainer`, a forking worker on the `train` queue, one training at a time, on `MIADPO_TRAIN_PROCESSES`
processes (`trainer.launch`: auto = every GPU of the machine). The job always resumes
(`run_training(resume=True)`): a re-run after its worker died, or a retry after a fault, continues from
the latest complete checkpoint under `trainings/{id}/output` instead of starting over.

Progress goes to the record on every optimizer step (step, total steps, latest metrics) and to the
events stream as `step` events (at most about one a second, plus the first and last step of each run)
and `checkpoint` events (every one). A cancel is honoured between optimizer steps: the step is saved as
a checkpoint and the training ends `cancelled`. A `UserError` (unknown model, empty or malformed export,
a pair set that is not there) fails the training at once; other faults are retried (`core.jobs`). A Redis
that is away for a while costs reports, not the training: they are skipped until it answers again.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from typing import Any

from redis import Redis

from core import jobs, records, trainings
from core.errors import UserError
from core.exports import export_dir
from core.jobs import REDIS_DOWN
from core.settings import get_settings
from core.store import ArtifactStore
from trainer.checkpoints import latest_checkpoint, list_checkpoints
from trainer.config import TrainHyperparameters

log = logging.getLogger(__name__)

STEP_EVENT_EVERY_S = 1.0


@lru_cache(maxsize=1)
def _redis() -> Redis:
    return Redis.from_url(get_settings().redis_url)


class _Reporter:
    """`ProgressCallback.report` for one run of a training's job: the record and its events."""

    def __init__(self, r: Redis, store: ArtifactStore, training_id: str) -> None:
        self.r, self.store, self.training_id = r, store, training_id
        self.last_step_event = float("-inf")
        self.steps_seen = 0

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            self._report(event)
        except REDIS_DOWN as exc:
            # Progress is advisory: a Redis restart must not end hours of training. The next step reports again.
            log.warning("training %s: %s not reported, Redis unreachable (%s)", self.training_id, event["event"], exc)

    def _report(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "step":
            self.steps_seen += 1
            now = time.monotonic()
            # The first step of a run (where a resumed run picks up), the last, and at most one a second between.
            due = self.steps_seen == 1 or event["step"] >= event["total_steps"] or now - self.last_step_event >= STEP_EVENT_EVERY_S
            extra = {"epoch": event.get("epoch"), "lr": event.get("lr")} if due else None
            records.report_training_step(
                self.r, self.training_id, step=event["step"], total_steps=event["total_steps"],
                metrics=event["metrics"], event=extra,
            )
            if due:
                self.last_step_event = now
        elif kind == "checkpoint":
            count = len(list_checkpoints(trainings.output_dir(self.store, self.training_id)))
            records.report_training_checkpoint(
                self.r, self.training_id, step=event["step"], count=count, metrics=event["metrics"]
            )


def run_training_job(training_id: str) -> dict[str, Any]:
    """Train the LoRA adapter of a training record on its pair set's export, resuming from the latest
    complete checkpoint; the record ends `succeeded` (adapter, final metrics) or `cancelled`.

    Args:
        training_id: the training record's id.

    Returns:
        {"status"} of the training afterwards, with "step" and "resumed_from" (the checkpoint step this run
        started from, 0 for a fresh start) when it ran.

    Raises:
        UserError: the pair set is gone or not succeeded, the hyperparameters or the model are refused,
            the export is empty or malformed (no retry).
        Anything else (a Redis blip, CUDA out of memory, a full disk): RQ retries the job, which resumes.
    """
    from trainer.launch import resolve_processes, train  # torch, transformers and TRL only in the work horse
    from trainer.train import default_device

    settings, r = get_settings(), _redis()
    store = ArtifactStore(settings.data_dir)
    record = records.find(r, records.TRAINING, training_id)
    if record is None:
        return {"status": "deleted"}
    if record["status"] in records.TRAINING_TERMINAL:
        if record["status"] == "succeeded" and record.get("evaluation"):
            jobs.create_training_evaluations(r, training_id, settings=settings)  # if the run that finished died first
        return {"status": record["status"]}  # a re-run after the work was done, or a cancel
    if records.cancel_requested(r, training_id):
        return {"status": records.set_training_status(r, training_id, "cancelled")["status"]}
    pairset = records.find(r, records.PAIRSET, record["pairset_id"])
    if pairset is None or pairset["status"] != "succeeded":
        state = pairset["status"] if pairset else "deleted"
        raise UserError(
            f"pair set {record['pairset_id']} is {state}, not succeeded", code="pairset_not_succeeded", param="pairset_id"
        )
    try:
        hp = TrainHyperparameters.from_dict(record["hyperparameters"])
    except ValueError as exc:
        raise UserError(f"invalid hyperparameters: {exc}", code="invalid_hyperparameters", param="hyperparameters") from None

    output = trainings.output_dir(store, training_id)
    start = latest_checkpoint(output)
    resumed_from = start.step if start else 0
    if records.start_training(r, training_id, step=resumed_from)["status"] != "running":
        return {"status": records.get(r, records.TRAINING, training_id)["status"]}
    if start:
        log.info("training %s resumes from checkpoint %d", training_id, start.step)

    def cancelled() -> bool:
        try:
            return records.cancel_requested(r, training_id)
        except REDIS_DOWN:  # asked again after the next step
            return False

    device = settings.device or default_device()
    result = train(
        num_processes=resolve_processes(settings.train_processes, device),
        report=_Reporter(r, store, training_id),
        should_stop=cancelled,
        model=record["model"],
        export_dir=export_dir(store, record["pairset_id"]),
        output_dir=output,
        hp=hp,
        checkpoint_every=record["checkpoint_every"],
        settings=settings,
        device=device,
        accelerate_config=settings.accelerate_config,
    )
    if result.cancelled:
        rec = records.set_training_status(r, training_id, "cancelled")
        return {"status": rec["status"], "step": result.global_step, "resumed_from": resumed_from}
    archive = trainings.build_adapter_archive(store, training_id, rebuild=True)
    metrics = {k: v for k, v in result.metrics.items() if k != "learning_rate"}  # as in the step events
    adapter = {"size_bytes": archive.stat().st_size, "url": f"/v1/trainings/{training_id}/adapter"}
    rec = records.finish_training(
        r, training_id, step=result.global_step, total_steps=result.total_steps, metrics=metrics, adapter=adapter
    )
    if rec["status"] == "succeeded" and rec.get("evaluation"):
        # The base model and the adapter, on the same held-out prompts: the training shows both.
        jobs.create_training_evaluations(r, training_id, settings=settings)
    return {"status": rec["status"], "step": result.global_step, "resumed_from": resumed_from}
