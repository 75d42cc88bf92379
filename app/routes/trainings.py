"""Trainings: DPO + LoRA on a succeeded pair set; follow it, fetch its checkpoints and adapter, cancel it (DESIGN 3.1)."""

from __future__ import annotations

import math
import shutil
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response, status
from redis import Redis

from app import admission
from app.deps import CurrentKey, IdempotencyKey, PageDep, RedisDep, SettingsDep, StoreDep
from app.downloads import ArchiveResponse, archive_responses
from app.events import EventsQueryDep, events_response, events_responses
from app.idempotency import fingerprint, run_once
from app.schemas import (
    Deleted,
    ErrorResponse,
    EventList,
    Training,
    TrainingCheckpointList,
    TrainingCreate,
    TrainingList,
)
from core import jobs, records, trainings
from core.errors import ConflictError, NotFoundError
from core.settings import Settings
from core.store import ArtifactStore
from trainer.checkpoints import list_checkpoints

router = APIRouter(
    prefix="/v1/trainings",
    tags=["trainings"],
    responses={401: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
)
TrainingId = Annotated[str, Path(min_length=1, max_length=64, description="The training's id (tr_...).")]
Step = Annotated[int, Path(ge=1, le=10**12, description="The checkpoint's optimizer step.")]

_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse}}
_CONFLICT: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}}


def _start_training(redis: Redis, settings: Settings, store: ArtifactStore, owner: str, body: TrainingCreate) -> dict[str, Any]:
    """Check the pair set (yours, succeeded, with pairs), record the training `queued`, enqueue its job."""
    try:
        pairset = records.get(redis, records.PAIRSET, body.pairset_id, owner)
    except NotFoundError as exc:
        raise NotFoundError(exc.message, code=exc.code, param="pairset_id") from None
    if pairset["status"] != "succeeded":
        raise ConflictError(
            f"pair set {body.pairset_id} is {pairset['status']}: a training needs a succeeded pair set",
            code="pairset_not_succeeded",
            param="pairset_id",
        )
    if not pairset["counts"]["pairs"]:
        raise ConflictError(f"pair set {body.pairset_id} has no pairs to train on", code="empty_pair_set", param="pairset_id")
    admission.check_training(
        settings,
        body.model or pairset["model"],
        body.hyperparameters.model_dump(),
        images=admission.max_images(pairset["config"]["augmentation"]),
        pairs=pairset["counts"]["pairs"],
        param="hyperparameters",
        model_param="model",
    )
    admission.check_running(redis, settings, records.TRAINING, owner)
    admission.check_storage(redis, settings, store, owner)
    record = records.create(
        redis,
        records.TRAINING,
        records.new_training(
            owner,
            pairset_id=body.pairset_id,
            model=body.model or pairset["model"],
            hyperparameters=body.hyperparameters.model_dump(mode="json"),
            preset=body.preset,
            evaluation=body.evaluation.model_dump(mode="json") if body.evaluation else None,
            checkpoint_every=body.checkpoint_every,
        ),
    )
    try:
        records.append_event(redis, record["id"], "created", {"status": "queued", "pairset_id": body.pairset_id})
        jobs.enqueue_training(redis, record["id"], settings=settings)
    except BaseException:
        records.delete(redis, records.TRAINING, record)  # no record waits for a job that never comes
        raise
    return Training.model_validate(record).model_dump(mode="json")


@router.post("", status_code=status.HTTP_201_CREATED, response_model=Training, responses=_CONFLICT)
def create_training(
    body: TrainingCreate,
    key: CurrentKey,
    redis: RedisDep,
    settings: SettingsDep,
    store: StoreDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    """Train a LoRA adapter with DPO on a succeeded pair set of yours."""
    return run_once(
        redis,
        settings,
        owner=key.owner,
        key=idempotency_key,
        request_fingerprint=fingerprint("training", body.model_dump(mode="json")),
        response=response,
        create=lambda: _start_training(redis, settings, store, key.owner, body),
    )


@router.get("", response_model=TrainingList)
def list_trainings(key: CurrentKey, redis: RedisDep, page: PageDep) -> dict[str, Any]:
    """Your trainings, newest first."""
    items, has_more = records.list_page(redis, records.TRAINING, key.owner, limit=page.limit, after=page.after)
    return {"object": "list", "data": items, "has_more": has_more}


@router.get("/{training_id}", response_model=Training, responses=_NOT_FOUND)
def get_training(training_id: TrainingId, key: CurrentKey, redis: RedisDep) -> dict[str, Any]:
    """One training: status, progress {step, total_steps}, latest metrics, checkpoints, adapter, error."""
    return records.get(redis, records.TRAINING, training_id, key.owner)


@router.get("/{training_id}/events", response_model=EventList, responses=events_responses("training"))
def list_training_events(
    request: Request, training_id: TrainingId, key: CurrentKey, redis: RedisDep, settings: SettingsDep, query: EventsQueryDep
) -> Any:
    """The training's events in order (status, step with metrics, checkpoint, resumed, retry); `Accept: text/event-stream` streams them."""
    records.get(redis, records.TRAINING, training_id, key.owner)
    return events_response(request, redis, settings.redis_url, records.TRAINING, training_id, query)


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


@router.get("/{training_id}/checkpoints", response_model=TrainingCheckpointList, responses=_NOT_FOUND)
def list_training_checkpoints(training_id: TrainingId, key: CurrentKey, redis: RedisDep, store: StoreDep) -> dict[str, Any]:
    """The training's complete checkpoints, oldest first, with the metrics of their step."""
    records.get(redis, records.TRAINING, training_id, key.owner)
    data = [
        {
            "step": c.step,
            "metrics": _finite(c.metrics),
            "created_at": int(c.created_at),
            "url": f"/v1/trainings/{training_id}/checkpoints/{c.step}/download",
        }
        for c in list_checkpoints(trainings.output_dir(store, training_id))
    ]
    return {"object": "list", "data": data, "has_more": False}


@router.get(
    "/{training_id}/checkpoints/{step}/download",
    response_class=ArchiveResponse,
    responses=archive_responses("The checkpoint's adapter and processor files as .tar.gz (no optimizer state)."),
)
def download_training_checkpoint(
    training_id: TrainingId, step: Step, key: CurrentKey, redis: RedisDep, store: StoreDep
) -> ArchiveResponse:
    """One checkpoint's adapter as .tar.gz; `Range` requests resume a download."""
    records.get(redis, records.TRAINING, training_id, key.owner)
    found = {c.step: c for c in list_checkpoints(trainings.output_dir(store, training_id))}
    if step not in found:
        raise NotFoundError(f"training {training_id} has no checkpoint at step {step}", code="checkpoint_not_found", param="step")
    path = trainings.build_checkpoint_archive(store, training_id, step, found[step].path)
    return ArchiveResponse(path, media_type=ArchiveResponse.media_type, filename=f"{training_id}-checkpoint-{step}.tar.gz")


@router.get(
    "/{training_id}/adapter",
    response_class=ArchiveResponse,
    responses=archive_responses(
        "The adapter as .tar.gz: adapter_config.json, adapter_model.safetensors and the processor files, "
        "loadable with `peft.PeftModel.from_pretrained`."
    ),
)
def download_training_adapter(training_id: TrainingId, key: CurrentKey, redis: RedisDep, store: StoreDep) -> ArchiveResponse:
    """The trained adapter as .tar.gz (409 until the training has succeeded); `Range` requests resume a download."""
    record = records.get(redis, records.TRAINING, training_id, key.owner)
    if record["status"] != "succeeded":
        raise ConflictError(
            f"training {training_id} is {record['status']}: the adapter exists once it has succeeded",
            code="training_not_succeeded",
            param="id",
        )
    path = trainings.build_adapter_archive(store, training_id)  # built by the job; rebuilt here only if it is gone
    return ArchiveResponse(path, media_type=ArchiveResponse.media_type, filename=path.name)


@router.post("/{training_id}/cancel", response_model=Training, responses=_CONFLICT)
def cancel_training(training_id: TrainingId, key: CurrentKey, redis: RedisDep) -> dict[str, Any]:
    """Cancel a training: it is cancelled at once; a running one stops after its current step, saved as a checkpoint (409 once finished)."""
    record = records.request_training_cancel(redis, training_id, key.owner)
    jobs.stop_training(redis, training_id)
    return record


@router.delete("/{training_id}", response_model=Deleted, responses=_CONFLICT)
def delete_training(training_id: TrainingId, key: CurrentKey, redis: RedisDep, store: StoreDep) -> dict[str, Any]:
    """Delete a finished training and its files: checkpoints, adapter, archives (409 while it runs: cancel first)."""
    record = records.get(redis, records.TRAINING, training_id, key.owner)
    if record["status"] not in records.TRAINING_TERMINAL:
        raise ConflictError(f"training {training_id} is {record['status']}: cancel it first", code="training_running", param="id")
    records.delete(redis, records.TRAINING, record)
    shutil.rmtree(trainings.training_dir(store, training_id), ignore_errors=True)
    return {"id": training_id, "object": "training", "deleted": True}
