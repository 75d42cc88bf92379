"""RQ entry points: ids in, inputs loaded from the store and Redis, the stages called, records updated.

Enqueued only by `core.jobs`. A job is idempotent: it checks its record first, so a retried or re-run
job (after a worker died) redoes its own work at most. User faults (`UserError`) fail the resource
without a retry; anything else is raised for RQ to retry with backoff, and when retries run out the
failure callback (`on_job_failure`) fails the resource with a generic error (details in the worker log).
"""

from __future__ import annotations

import logging
import shutil
from functools import lru_cache
from typing import Any

from redis import Redis
from rq.exceptions import AbandonedJobError
from rq.timeouts import JobTimeoutException

from core import records
from core.dataset import dataset_dir
from core.errors import MiadpoError, NotFoundError, TransientError, UserError
from core.settings import get_settings
from core.store import ArtifactStore

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _redis() -> Redis:
    return Redis.from_url(get_settings().redis_url)


def _store() -> ArtifactStore:
    return ArtifactStore(get_settings().data_dir)


def ingest_dataset(dataset_id: str) -> dict[str, Any]:
    """Validate and normalise an uploaded dataset; the record ends `ready` (counts, problems) or `failed`.

    Args:
        dataset_id: the dataset record's id; its `upload` is the uploaded file under the store.

    Returns:
        The outcome for the RQ job result: {"status", "num_samples", "num_problems"}.

    Raises:
        Anything but UserError (a Redis blip, a full disk): RQ retries the job.
    """
    from workers.ingest import IngestLimits, ingest  # PIL and numpy only in the work horse

    settings, r, store = get_settings(), _redis(), _store()
    record = records.find(r, records.DATASET, dataset_id)
    if record is None or record["status"] != "validating":
        return {"status": record["status"] if record else "deleted"}  # a re-run after the work was done
    try:
        manifest = ingest(
            store.path(record["upload"]),
            store,
            dataset_id,
            limits=IngestLimits.from_settings(settings),
            source_format=record["format"],
        )
    except UserError as exc:
        log.info("dataset %s refused: %s: %s", dataset_id, exc.code, exc.message)
        code, message = exc.code, exc.message
        _forget(r, dataset_id, lambda: records.set_dataset_failed(r, dataset_id, code=code, message=message))
        shutil.rmtree(store.path("uploads", dataset_id), ignore_errors=True)
        return {"status": "failed"}
    try:
        records.set_dataset_ready(r, dataset_id, manifest.to_dict(), max_problems=settings.max_problems_listed)
    except NotFoundError:
        # Deleted while we were ingesting: take back what we wrote.
        shutil.rmtree(dataset_dir(store, dataset_id), ignore_errors=True)
        return {"status": "deleted"}
    # Only now: a retry after a failed record update still finds the upload.
    shutil.rmtree(store.path("uploads", dataset_id), ignore_errors=True)
    return {"status": "ready", "num_samples": manifest.num_samples, "num_problems": len(manifest.problems)}


def run_pairset(pairset_id: str) -> dict[str, Any]:
    """PLACEHOLDER for the pair-set pipeline (DESIGN 2.2-2.6): marks the pair set failed, `not_implemented`.

    Args:
        pairset_id: the pair-set record's id.

    Returns:
        {"status"} of the pair set afterwards.
    """
    r = _redis()
    if records.find(r, records.PAIRSET, pairset_id) is None:
        return {"status": "deleted"}
    if records.cancel_requested(r, pairset_id):
        rec = records.set_pairset_status(r, pairset_id, "cancelled")
    else:
        rec = records.set_pairset_status(
            r,
            pairset_id,
            "failed",
            error={"code": "not_implemented", "message": "the pair-set pipeline is not implemented yet"},
        )
    return {"status": rec["status"]}


# --------------------------------------------------------------------------------------------------
# RQ callbacks (set on every job by core.jobs.enqueue)


def _forget(r: Redis, resource_id: str, write: Any) -> None:
    """Run a record write; a record deleted in the meantime is not an error."""
    try:
        write()
    except NotFoundError:
        log.info("record %s is gone; nothing to update", resource_id)


def _error_of(exc_type: type[BaseException] | None, exc: BaseException | None) -> dict[str, str]:
    """The {code, message} a user sees for a job that failed for good; internals stay in the log."""
    if exc_type is not None and issubclass(exc_type, JobTimeoutException):
        return {"code": "job_timeout", "message": "the job ran past its time limit"}
    if exc_type is not None and issubclass(exc_type, AbandonedJobError):
        return {"code": "worker_lost", "message": "the worker running the job died, and retries ran out"}
    if isinstance(exc, TransientError):
        return {"code": exc.code, "message": f"{exc.message} (retries ran out)"}
    if isinstance(exc, MiadpoError):
        return {"code": exc.code, "message": exc.message}
    name = exc_type.__name__ if exc_type else "error"
    return {"code": "internal_error", "message": f"internal error ({name}); see the worker log"}


def on_job_failure(job: Any, connection: Redis, exc_type: Any = None, exc: Any = None, tb: Any = None) -> None:
    """A job raised, timed out or was abandoned: note a coming retry, or fail its resource for good.

    A `UserError` is never retried, whichever job raises it: the resource fails with its code and message.
    """
    resource = (job.meta or {}).get("resource")
    if not resource:
        return
    kind, resource_id = resource
    if isinstance(exc, UserError):
        # Bad input does not get better by retrying; RQ reads retries_left right after this callback.
        job.retries_left = 0
    if job.retries_left:  # RQ retries it right after this callback
        name = exc_type.__name__ if exc_type else "error"
        records.append_event(connection, resource_id, "retry", {"job": job.id, "error": name, "retries_left": job.retries_left})
        return
    error = _error_of(exc_type, exc)
    log.warning("job %s failed for good: %s", job.id, error)
    if kind == records.DATASET:
        _forget(connection, resource_id, lambda: records.set_dataset_failed(connection, resource_id, **error))
    elif kind == records.PAIRSET:
        _forget(connection, resource_id, lambda: records.set_pairset_status(connection, resource_id, "failed", error=error))


def on_job_stopped(job: Any, connection: Redis) -> None:
    """A job was stopped on request (a cancel): its pair set ends `cancelled`."""
    resource = (job.meta or {}).get("resource")
    if not resource:
        return
    kind, resource_id = resource
    if kind == records.PAIRSET:
        _forget(connection, resource_id, lambda: records.set_pairset_status(connection, resource_id, "cancelled"))
    elif kind == records.DATASET:
        error = {"code": "stopped", "message": "the ingest job was stopped"}
        _forget(connection, resource_id, lambda: records.set_dataset_failed(connection, resource_id, **error))
