"""Evaluations: score a model, or a training's adapter, on held-out multi-image and single-image prompts
(DESIGN 6); follow it, page its per-sample records, cancel it. The work runs in the workers
(`workers.tasks`); the records are read here with the standard library only (`core.evaluations`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response, status
from redis import Redis

from app import admission
from app.deps import CurrentKey, IdempotencyKey, PageDep, RedisDep, SettingsDep, StoreDep
from app.events import EventsQueryDep, events_response, events_responses
from app.idempotency import fingerprint, run_once
from app.schemas import (
    ErrorResponse,
    Evaluation,
    EvaluationCreate,
    EvaluationList,
    EvaluationSampleList,
    EventList,
)
from core import evaluations, jobs, records
from core.errors import ConflictError, NotFoundError
from core.settings import Settings

router = APIRouter(
    prefix="/v1/evaluations",
    tags=["evaluations"],
    responses={401: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
)
EvaluationId = Annotated[str, Path(min_length=1, max_length=64, description="The evaluation's id (ev_...).")]
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse}}
_CONFLICT: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}}


def _owned(redis: Redis, kind: str, resource_id: str, owner: str, param: str) -> records.Record:
    try:
        return records.get(redis, kind, resource_id, owner)
    except NotFoundError as exc:
        raise NotFoundError(exc.message, code=exc.code, param=param) from None


def _start_evaluation(redis: Redis, settings: Settings, owner: str, body: EvaluationCreate) -> dict[str, Any]:
    """Check the dataset (yours, ready) and the training (yours, succeeded), record the evaluation, enqueue it."""
    dataset = _owned(redis, records.DATASET, body.dataset_id, owner, "dataset_id")
    if dataset["status"] != "ready":
        raise ConflictError(f"dataset {body.dataset_id} is {dataset['status']}, not ready", code="dataset_not_ready", param="dataset_id")
    config = body.model_dump(mode="json")
    if body.training_id is not None:
        training = _owned(redis, records.TRAINING, body.training_id, owner, "training_id")
        if training["status"] != "succeeded":
            raise ConflictError(
                f"training {body.training_id} is {training['status']}: its adapter exists once it has succeeded",
                code="training_not_succeeded",
                param="training_id",
            )
        if "model" not in body.model_fields_set:
            config["model"] = training["model"]  # the adapter's own base model
    admission.check_model(settings, config["model"], "model")
    record = records.create(
        redis,
        records.EVALUATION,
        records.new_evaluation(owner, model=config["model"], dataset_id=body.dataset_id, config=config, training_id=body.training_id),
    )
    try:
        records.append_event(redis, record["id"], "created", {"status": "queued"})
        jobs.enqueue_evaluation(redis, record["id"], settings=settings)
    except BaseException:
        records.delete(redis, records.EVALUATION, record)  # no record waits for a job that never comes
        raise
    return Evaluation.model_validate(record).model_dump(mode="json")


@router.post("", status_code=status.HTTP_201_CREATED, response_model=Evaluation, responses=_CONFLICT)
def create_evaluation(
    body: EvaluationCreate,
    key: CurrentKey,
    redis: RedisDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    """Evaluate a model (or a training's adapter) on multi-image prompts from a held-out dataset and on the same samples alone."""
    return run_once(
        redis,
        settings,
        owner=key.owner,
        key=idempotency_key,
        request_fingerprint=fingerprint("evaluation", body.model_dump(mode="json")),
        response=response,
        create=lambda: _start_evaluation(redis, settings, key.owner, body),
    )


@router.get("", response_model=EvaluationList)
def list_evaluations(key: CurrentKey, redis: RedisDep, page: PageDep) -> dict[str, Any]:
    """Your evaluations, newest first."""
    items, has_more = records.list_page(redis, records.EVALUATION, key.owner, limit=page.limit, after=page.after)
    return {"object": "list", "data": items, "has_more": has_more}


@router.get("/{evaluation_id}", response_model=Evaluation, responses=_NOT_FOUND)
def get_evaluation(evaluation_id: EvaluationId, key: CurrentKey, redis: RedisDep) -> dict[str, Any]:
    """One evaluation: status, progress and, once succeeded, its result."""
    return records.get(redis, records.EVALUATION, evaluation_id, key.owner)


@router.get("/{evaluation_id}/events", response_model=EventList, responses=events_responses("evaluation"))
def list_evaluation_events(
    request: Request, evaluation_id: EvaluationId, key: CurrentKey, redis: RedisDep, settings: SettingsDep, query: EventsQueryDep
) -> Any:
    """The evaluation's events in order (status, stage, progress); `Accept: text/event-stream` streams them."""
    records.get(redis, records.EVALUATION, evaluation_id, key.owner)
    return events_response(request, redis, settings.redis_url, records.EVALUATION, evaluation_id, query)


@router.get("/{evaluation_id}/samples", response_model=EvaluationSampleList, responses=_CONFLICT)
def list_evaluation_samples(
    evaluation_id: EvaluationId,
    key: CurrentKey,
    redis: RedisDep,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Records per page.")] = 20,
    after: Annotated[str | None, Query(max_length=64, pattern=r"^\d+-\d+$", description="Cursor: the last uid of the previous page.")] = None,
) -> dict[str, Any]:
    """A page of the per-sample records (prompt, answer, truths, correct, confused-with), once the evaluation has succeeded."""
    record = records.get(redis, records.EVALUATION, evaluation_id, key.owner)
    if record["status"] != "succeeded":
        raise ConflictError(
            f"evaluation {evaluation_id} is {record['status']}: its records exist once it has succeeded",
            code="evaluation_not_succeeded",
            param="id",
        )
    data, has_more = evaluations.samples_page(evaluations.samples_path(store, evaluation_id), limit=limit, after=after)
    return {"object": "list", "data": data, "has_more": has_more}


@router.post("/{evaluation_id}/cancel", response_model=Evaluation, responses=_CONFLICT)
def cancel_evaluation(evaluation_id: EvaluationId, key: CurrentKey, redis: RedisDep) -> dict[str, Any]:
    """Cancel an evaluation: it is cancelled at once, queued jobs are dropped, running ones stop at their next batch (409 once finished)."""
    record = records.request_evaluation_cancel(redis, evaluation_id, key.owner)
    jobs.stop_sharded(redis, records.EVALUATION, evaluation_id)
    return record
