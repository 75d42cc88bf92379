"""Pair sets: start the pipeline on a ready dataset, follow it, cancel it, preview its pairs and download
the export (DESIGN 3.1). The pipeline itself runs in the workers (`workers.tasks`); the export is read
here with pyarrow only (`core.exports`)."""

from __future__ import annotations

import shutil
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response, status
from redis import Redis

from app import admission
from app import prompts as prompt_views
from app.deps import CurrentKey, IdempotencyKey, PageDep, RedisDep, SettingsDep, StoreDep
from app.downloads import BINARY as _BINARY
from app.downloads import JSON_ERRORS as _JSON_ERRORS
from app.downloads import ArchiveResponse, archive_responses
from app.events import EventsQueryDep, events_response, events_responses
from app.idempotency import fingerprint, run_once
from app.schemas import (
    Deleted,
    ErrorResponse,
    EventList,
    PairList,
    PairSet,
    PairSetCreate,
    PairSetList,
    PromptList,
)
from core import exports, jobs, prompts, records
from core.errors import ConflictError, NotFoundError
from core.settings import Settings
from core.store import ArtifactStore

router = APIRouter(
    prefix="/v1/pairsets",
    tags=["pairsets"],
    responses={401: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
)
PairSetId = Annotated[str, Path(min_length=1, max_length=64, description="The pair set's id (ps_...).")]
PairUid = Annotated[str, Path(max_length=64, pattern=r"^\d+-\d+$", description="A pair's uid (`{seed}-{index}`).")]


def _admit(redis: Redis, settings: Settings, store: ArtifactStore, owner: str, body: PairSetCreate) -> None:
    """What this deployment and the model allow, and the key's quotas (`app.admission`)."""
    admission.check_prompts(settings, body.augmentation.num)
    admission.check_endpoint(settings, body.generation.model_dump())
    admission.check_model(settings, body.model, "model")
    if body.train is not None:
        admission.check_training(
            settings,
            body.train.model or body.model,
            body.train.hyperparameters.model_dump(),
            images=admission.max_images(body.augmentation.model_dump(mode="json")),
            pairs=body.augmentation.num,  # at most one pair per prompt
            param="train.hyperparameters",
            model_param="train.model" if body.train.model else "model",
        )
    admission.check_running(redis, settings, records.PAIRSET, owner)
    admission.check_storage(redis, settings, store, owner)


def _start_pairset(redis: Redis, settings: Settings, store: ArtifactStore, owner: str, body: PairSetCreate) -> dict[str, Any]:
    """Check the dataset (yours, ready), record the pair set `queued`, and hand it to the pipeline hook."""
    _admit(redis, settings, store, owner, body)
    try:
        dataset = records.get(redis, records.DATASET, body.dataset_id, owner)
    except NotFoundError as exc:
        raise NotFoundError(exc.message, code=exc.code, param="dataset_id") from None
    if dataset["status"] != "ready":
        raise ConflictError(
            f"dataset {body.dataset_id} is {dataset['status']}, not ready", code="dataset_not_ready", param="dataset_id"
        )
    record = records.create(
        redis,
        records.PAIRSET,
        records.new_pairset(owner, dataset_id=body.dataset_id, model=body.model, config=body.model_dump(mode="json")),
    )
    try:
        records.append_event(redis, record["id"], "created", {"status": "queued"})
        jobs.enqueue_pairset(redis, record["id"], settings=settings)
    except BaseException:
        records.delete(redis, records.PAIRSET, record)  # no record waits for a job that never comes
        raise
    return PairSet.model_validate(record).model_dump(mode="json")


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=PairSet,
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
)
def create_pairset(
    body: PairSetCreate,
    key: CurrentKey,
    redis: RedisDep,
    settings: SettingsDep,
    store: StoreDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    """Make preference pairs from a ready dataset: augment, generate, select by attention, post-select, export."""
    return run_once(
        redis,
        settings,
        owner=key.owner,
        key=idempotency_key,
        request_fingerprint=fingerprint("pairset", body.model_dump(mode="json")),
        response=response,
        create=lambda: _start_pairset(redis, settings, store, key.owner, body),
    )


@router.get("", response_model=PairSetList)
def list_pairsets(key: CurrentKey, redis: RedisDep, page: PageDep) -> dict[str, Any]:
    """Your pair sets, newest first."""
    items, has_more = records.list_page(redis, records.PAIRSET, key.owner, limit=page.limit, after=page.after)
    return {"object": "list", "data": items, "has_more": has_more}


@router.get("/{pairset_id}", response_model=PairSet, responses={404: {"model": ErrorResponse}})
def get_pairset(pairset_id: PairSetId, key: CurrentKey, redis: RedisDep) -> dict[str, Any]:
    """One pair set: status, stage, progress, counts, error."""
    return records.get(redis, records.PAIRSET, pairset_id, key.owner)


@router.get("/{pairset_id}/events", response_model=EventList, responses=events_responses("pair set"))
def list_pairset_events(
    request: Request, pairset_id: PairSetId, key: CurrentKey, redis: RedisDep, settings: SettingsDep, query: EventsQueryDep
) -> Any:
    """The pair set's events in order (stage changes, warnings, errors); `Accept: text/event-stream` streams them."""
    records.get(redis, records.PAIRSET, pairset_id, key.owner)
    return events_response(request, redis, settings.redis_url, records.PAIRSET, pairset_id, query)


@router.post(
    "/{pairset_id}/cancel",
    response_model=PairSet,
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
)
def cancel_pairset(pairset_id: PairSetId, key: CurrentKey, redis: RedisDep) -> dict[str, Any]:
    """Cancel a pair set: it is cancelled at once, queued jobs are dropped and running ones stop at their next batch (409 once finished)."""
    record = records.request_cancel(redis, pairset_id, key.owner)
    jobs.stop_pairset(redis, pairset_id)
    return record


class PngResponse(Response):
    media_type = "image/png"


_FINISHED_RESPONSES: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}}
_IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The image, as exported.", "content": {"image/png": _BINARY}},
    **_JSON_ERRORS,
}
_DOWNLOAD_RESPONSES = archive_responses("The export as .tar.gz: data/*.parquet, README.md (the dataset card), histograms/.")


def _export(redis: Redis, store: ArtifactStore, pairset_id: str, owner: str) -> Any:
    """The export folder of a pair set of yours that has succeeded (409 before then: there is none yet)."""
    record = records.get(redis, records.PAIRSET, pairset_id, owner)
    if record["status"] != "succeeded":
        raise ConflictError(
            f"pair set {pairset_id} is {record['status']}: pairs exist once it has succeeded",
            code="pairset_not_succeeded",
            param="id",
        )
    return exports.export_dir(store, pairset_id)


@router.get("/{pairset_id}/pairs", response_model=PairList, responses=_FINISHED_RESPONSES)
def list_pairs(
    pairset_id: PairSetId,
    key: CurrentKey,
    redis: RedisDep,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Pairs per page.")] = 20,
    after: Annotated[str | None, Query(max_length=64, pattern=r"^\d+-\d+$", description="Cursor: the last uid of the previous page.")] = None,
) -> dict[str, Any]:
    """A page of the exported pairs, in order, with their metadata and image URLs (once the pair set has succeeded)."""
    rows, has_more = exports.preview_page(_export(redis, store, pairset_id, key.owner), limit=limit, after=after)
    for row in rows:
        row["image_urls"] = [f"/v1/pairsets/{pairset_id}/pairs/{row['uid']}/images/{k}" for k in range(row["n_images"])]
    return {"object": "list", "data": rows, "has_more": has_more}


@router.get(
    "/{pairset_id}/pairs/{uid}/images/{index}",
    response_class=PngResponse,
    responses=_IMAGE_RESPONSES,
)
def get_pair_image(
    pairset_id: PairSetId,
    uid: PairUid,
    index: Annotated[int, Path(ge=0, le=64, description="0-based position of the image in the prompt.")],
    key: CurrentKey,
    redis: RedisDep,
    store: StoreDep,
) -> Response:
    """One image of an exported pair, PNG."""
    data = exports.pair_image(_export(redis, store, pairset_id, key.owner), uid, index)
    if data is None:
        raise NotFoundError(f"pair set {pairset_id} has no image {index} of pair {uid}", code="image_not_found", param="uid")
    return PngResponse(data, headers={"Cache-Control": "private, max-age=86400"})


@router.get("/{pairset_id}/download", response_class=ArchiveResponse, responses=_DOWNLOAD_RESPONSES)
def download_pairset(pairset_id: PairSetId, key: CurrentKey, redis: RedisDep, store: StoreDep) -> ArchiveResponse:
    """The export as one .tar.gz (parquet shards, dataset card, histograms); `Range` requests resume a download."""
    export = _export(redis, store, pairset_id, key.owner)
    # Built on the first download and kept; the merge removes it when it writes a new export.
    path = exports.build_archive(export, exports.archive_path(store, pairset_id), root=pairset_id)
    return ArchiveResponse(path, media_type=ArchiveResponse.media_type, filename=f"{pairset_id}.tar.gz")


@router.delete("/{pairset_id}", response_model=Deleted, responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}})
def delete_pairset(pairset_id: PairSetId, key: CurrentKey, redis: RedisDep, store: StoreDep) -> dict[str, Any]:
    """Delete a finished pair set and its files: shards, export, archive (409 while it runs, or while an
    unfinished training uses it: cancel first)."""
    record = records.get(redis, records.PAIRSET, pairset_id, key.owner)
    if record["status"] not in records.PAIRSET_TERMINAL:
        raise ConflictError(f"pair set {pairset_id} is {record['status']}: cancel it first", code="pairset_running", param="id")
    for training_id in records.ids_of(redis, records.TRAINING, key.owner):
        training = records.find(redis, records.TRAINING, training_id)
        if training and training["pairset_id"] == pairset_id and training["status"] not in records.TRAINING_TERMINAL:
            raise ConflictError(f"training {training_id} is still using pair set {pairset_id}", code="pairset_in_use", param="id")
    records.delete(redis, records.PAIRSET, record)
    shutil.rmtree(exports.pairset_dir(store, pairset_id), ignore_errors=True)
    return {"id": pairset_id, "object": "pairset", "deleted": True}


@router.get("/{pairset_id}/prompts", response_model=PromptList, responses=_FINISHED_RESPONSES)
def list_prompts(
    pairset_id: PairSetId,
    key: CurrentKey,
    redis: RedisDep,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Prompts per page.")] = 20,
    after: Annotated[str | None, Query(max_length=64, pattern=r"^\d+-\d+$", description="Cursor: the last uid of the previous page.")] = None,
    format: Annotated[
        Literal["sequence", "grid", "pic_in_pic"] | None, Query(description="Only prompts of this format.")
    ] = None,
    n_images: Annotated[int | None, Query(ge=1, le=64, description="Only prompts with this many source images.")] = None,
    outcome: Annotated[
        Literal["exported", "no_pair", "perplexity_gate", "perplexity", "length_ratio", "edit_distance"] | None,
        Query(description="Only prompts with this outcome."),
    ] = None,
) -> dict[str, Any]:
    """Every prompt of a succeeded pair set, paired or not, in order: the question and answer, each candidate's
    ratio against the threshold and its verdict, the outcome, image and heat-map URLs; filters and a cursor."""
    prompt_views.succeeded_pairset(redis, pairset_id, key.owner)
    data, has_more, total = prompt_views.page(
        store, pairset_id, prompts.Filters(format=format, n_images=n_images, outcome=outcome), limit=limit, after=after
    )
    return {"object": "list", "data": data, "has_more": has_more, "total": total}


_PROMPT_IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The image, PNG.", "content": {"image/png": _BINARY}},
    **_JSON_ERRORS,
}


@router.get("/{pairset_id}/prompts/{uid}/images/{index}", response_class=PngResponse, responses=_PROMPT_IMAGE_RESPONSES)
def get_prompt_image(
    pairset_id: PairSetId,
    uid: PairUid,
    index: Annotated[int, Path(ge=0, le=64, description="0-based position of the image the model was given.")],
    key: CurrentKey,
    redis: RedisDep,
    store: StoreDep,
) -> Response:
    """One image of a prompt (a sequence's image, or the grid / pic-in-pic collage), rendered on request and cached."""
    prompt_views.succeeded_pairset(redis, pairset_id, key.owner)
    return PngResponse(prompt_views.image_png(store, pairset_id, uid, index), headers={"Cache-Control": "private, max-age=86400"})


@router.get(
    "/{pairset_id}/prompts/{uid}/candidates/{candidate}/heatmaps/{index}",
    response_class=PngResponse,
    responses=_PROMPT_IMAGE_RESPONSES,
)
def get_prompt_heatmap(
    pairset_id: PairSetId,
    uid: PairUid,
    candidate: Annotated[int, Path(ge=0, le=64, description="0-based position of the candidate.")],
    index: Annotated[int, Path(ge=0, le=64, description="0-based position of the image the model was given.")],
    key: CurrentKey,
    redis: RedisDep,
    store: StoreDep,
) -> Response:
    """A candidate's attention over one image of its prompt (the target outlined), PNG, rendered on request and cached."""
    prompt_views.succeeded_pairset(redis, pairset_id, key.owner)
    data = prompt_views.heatmap_png(store, pairset_id, uid, candidate, index)
    return PngResponse(data, headers={"Cache-Control": "private, max-age=86400"})
