"""Dataset records: validating until the ingest job has read the upload, then ready or failed."""

from __future__ import annotations

from typing import Any

from redis import Redis

from core.records.base import (
    DATASET,
    Record,
    now,
    update,
)


def new_dataset(owner: str, *, dataset_id: str, name: str | None, format: str | None, upload: str) -> Record:
    """A dataset record as created by an upload: `validating` until the ingest job is done.

    `upload` is the path of the uploaded file relative to the artifact store.
    """
    return {
        "id": dataset_id,
        "object": "dataset",
        "name": name,
        "format": format,
        "status": "validating",
        "num_rows": 0,
        "num_samples": 0,
        "num_images": 0,
        "num_problems": 0,
        "problems": [],
        "error": None,
        "created_at": now(),
        "owner": owner,
        "upload": upload,
    }


def set_dataset_ready(r: Redis, dataset_id: str, manifest: dict[str, Any], *, max_problems: int) -> Record:
    """Store an ingested dataset's counts and (the first `max_problems`) problems; status `ready`."""

    def mutate(rec: Record) -> Record:
        problems = manifest.get("problems", [])
        rec.update(
            status="ready",
            format=manifest["source_format"],
            num_rows=manifest["num_rows"],
            num_samples=manifest["num_samples"],
            num_images=manifest["num_images"],
            num_problems=len(problems),
            problems=problems[:max_problems],
            error=None,
        )
        return rec

    return update(r, DATASET, dataset_id, mutate, event=lambda rec: ("status", {"status": "ready"}))


def set_dataset_failed(r: Redis, dataset_id: str, *, code: str, message: str) -> Record:
    """Status `failed` with {code, message}; a dataset that is already ready stays ready."""

    def mutate(rec: Record) -> Record | None:
        if rec["status"] != "validating":
            return None
        rec.update(status="failed", error={"code": code, "message": message})
        return rec

    return update(r, DATASET, dataset_id, mutate, event=lambda rec: ("status", {"status": "failed", "error": rec["error"]}))

