"""Datasets: upload, list, get, delete (DESIGN 3.1)."""

from __future__ import annotations

import shutil
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from redis import Redis

from app import admission
from app.deps import CurrentKey, IdempotencyKey, PageDep, RedisDep, SettingsDep, StoreDep
from app.idempotency import fingerprint, run_once
from app.schemas import Dataset, DatasetCreate, DatasetList, Deleted, ErrorResponse
from app.uploads import FILE_FIELD, Upload, UploadDep
from core import images, jobs, records
from core.dataset import dataset_dir
from core.errors import ConflictError
from core.settings import Settings
from core.store import ArtifactStore

router = APIRouter(
    prefix="/v1/datasets",
    tags=["datasets"],
    responses={401: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
)
DatasetId = Annotated[str, Path(min_length=1, max_length=64, description="The dataset's id (ds_...).")]

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FILE_FIELD],
                    "properties": {
                        FILE_FIELD: {
                            "type": "string",
                            "format": "binary",
                            "description": "A .zip / .tar(.gz) with the rows and images, or a .json/.jsonl/.parquet file.",
                        },
                        "name": {"type": "string", "minLength": 1, "maxLength": 200},
                        "format": {"type": "string", "enum": ["llava", "jsonl", "parquet"]},
                    },
                }
            }
        },
    }
}


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return Dataset.model_validate(record).model_dump(mode="json")


def _form(upload: Upload) -> DatasetCreate:
    """The upload's other form fields, validated like a JSON body would be (422 naming the field)."""
    try:
        return DatasetCreate.model_validate(upload.fields)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def _start_ingest(redis: Redis, store: ArtifactStore, settings: Settings, owner: str, upload: Upload, form: DatasetCreate) -> dict[str, Any]:
    """Keep the upload under a new dataset id, record it `validating`, enqueue its ingest job."""
    admission.check_storage(redis, settings, store, owner, adding=upload.size)
    dataset_id = records.new_id(records.DATASET)
    rel = upload.move_to(store, dataset_id)
    record = records.create(
        redis, records.DATASET, records.new_dataset(owner, dataset_id=dataset_id, name=form.name, format=form.format, upload=rel)
    )
    try:
        records.append_event(redis, dataset_id, "status", {"status": "validating"})
        jobs.enqueue_ingest(redis, dataset_id, settings=settings)
    except BaseException:
        records.delete(redis, records.DATASET, record)  # no record waits for a job that never comes
        raise
    return _public(record)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=Dataset,
    openapi_extra=_UPLOAD_BODY,
    responses={
        400: {"model": ErrorResponse}, 409: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 429: {"model": ErrorResponse}
    },
)
def create_dataset(
    key: CurrentKey,
    upload: UploadDep,
    redis: RedisDep,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    """Upload a dataset; it is validated in the background (status `validating`, then `ready` or `failed`)."""
    with upload.discarded_on_error():
        form = _form(upload)
        return run_once(
            redis,
            settings,
            owner=key.owner,
            key=idempotency_key,
            request_fingerprint=fingerprint("dataset", upload.sha256, upload.filename, form.model_dump()),
            response=response,
            create=lambda: _start_ingest(redis, store, settings, key.owner, upload, form),
            on_replay=upload.discard,
        )


@router.get("", response_model=DatasetList)
def list_datasets(key: CurrentKey, redis: RedisDep, page: PageDep) -> dict[str, Any]:
    """Your datasets, newest first."""
    items, has_more = records.list_page(redis, records.DATASET, key.owner, limit=page.limit, after=page.after)
    return {"object": "list", "data": items, "has_more": has_more}


@router.get("/{dataset_id}", response_model=Dataset, responses={404: {"model": ErrorResponse}})
def get_dataset(dataset_id: DatasetId, key: CurrentKey, redis: RedisDep) -> dict[str, Any]:
    """One dataset: status, counts and per-row problems."""
    return records.get(redis, records.DATASET, dataset_id, key.owner)


@router.delete(
    "/{dataset_id}", response_model=Deleted, responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}}
)
def delete_dataset(dataset_id: DatasetId, key: CurrentKey, redis: RedisDep, store: StoreDep) -> dict[str, Any]:
    """Delete a dataset and its files (409 while an unfinished pair set uses it)."""
    record = records.get(redis, records.DATASET, dataset_id, key.owner)
    for pairset_id in records.ids_of(redis, records.PAIRSET, key.owner):
        pairset = records.find(redis, records.PAIRSET, pairset_id)
        if pairset and pairset["dataset_id"] == dataset_id and pairset["status"] not in records.PAIRSET_TERMINAL:
            raise ConflictError(
                f"pair set {pairset_id} is still using dataset {dataset_id}", code="dataset_in_use", param="id"
            )
    jobs.stop_job(redis, jobs.ingest_job_id(dataset_id))
    records.delete(redis, records.DATASET, record)
    # Images are content-addressed and may be shared with other datasets: those no dataset uses go.
    images.release(redis, store, dataset_id)
    shutil.rmtree(dataset_dir(store, dataset_id), ignore_errors=True)
    shutil.rmtree(store.path("uploads", dataset_id), ignore_errors=True)
    return {"id": dataset_id, "object": "dataset", "deleted": True}
