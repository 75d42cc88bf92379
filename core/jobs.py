"""RQ queues and the one place that enqueues jobs (DESIGN 3.2).

Queues by what a job needs: `cpu` (ingest, augmentation, merge, export), `gpu` (generation and the
attention pass), `train`. Job functions are named by import path, so core never imports the workers.
Every job gets an explicit id derived from its resource (a job for a resource is found without a lookup
table), a timeout, `Retry` with backoff for faults that may pass, and `job.meta["resource"]` so the
failure and stop callbacks (`workers.tasks`) know which record to update when a job dies for good.
"""

from __future__ import annotations

from typing import Any

from redis import Redis
from rq import Callback, Queue, Retry
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus

from core import records
from core.settings import Settings

CPU, GPU, TRAIN = "cpu", "gpu", "train"
QUEUES = (CPU, GPU, TRAIN)

_FAILURE_CALLBACK = "workers.tasks.on_job_failure"
_STOPPED_CALLBACK = "workers.tasks.on_job_stopped"
_RESULT_TTL_S = 24 * 3600
_FAILURE_TTL_S = 7 * 24 * 3600
_REGISTRIES = ("started", "scheduled", "deferred", "finished", "failed", "canceled")


def get_queue(connection: Redis, name: str) -> Queue:
    """One of the project's queues."""
    if name not in QUEUES:
        raise ValueError(f"queue must be one of {', '.join(QUEUES)}, got {name!r}")
    return Queue(name, connection=connection)


def retry_policy(settings: Settings) -> Retry | None:
    """`Retry(max, interval=[...])` from the settings; None when retries are off."""
    if settings.job_retry_max <= 0:
        return None
    return Retry(max=settings.job_retry_max, interval=list(settings.job_retry_intervals))


def enqueue(
    connection: Redis,
    settings: Settings,
    queue_name: str,
    func: str,
    *args: Any,
    job_id: str,
    timeout: int,
    resource: tuple[str, str] | None = None,
    depends_on: Job | str | list[Job | str] | None = None,
) -> Job:
    """Enqueue `func(*args)`: the only call of `Queue.enqueue` in the project.

    Args:
        func: import path of the job function, e.g. "workers.tasks.ingest_dataset".
        job_id: explicit, derived from the resource, so a job can be found (and stopped) by resource id.
        timeout: seconds before RQ kills the job.
        resource: (kind, id) of the record the job works for; its callbacks fail or cancel that record.
        depends_on: jobs that must finish first (e.g. a merge waiting for all shards).
    """
    meta = {"resource": list(resource)} if resource else {}
    return get_queue(connection, queue_name).enqueue(
        func,
        *args,
        job_id=job_id,
        job_timeout=timeout,
        retry=retry_policy(settings),
        meta=meta,
        depends_on=depends_on,
        on_failure=Callback(_FAILURE_CALLBACK),
        on_stopped=Callback(_STOPPED_CALLBACK),
        result_ttl=_RESULT_TTL_S,
        failure_ttl=_FAILURE_TTL_S,
        description=f"{func.rsplit('.', 1)[-1]}({', '.join(map(str, args))})",
    )


def ingest_job_id(dataset_id: str) -> str:
    return f"ingest-{dataset_id}"


def enqueue_ingest(connection: Redis, dataset_id: str, *, settings: Settings) -> Job:
    """Validate and normalise an uploaded dataset (`workers.tasks.ingest_dataset`) on the cpu queue."""
    return enqueue(
        connection,
        settings,
        CPU,
        "workers.tasks.ingest_dataset",
        dataset_id,
        job_id=ingest_job_id(dataset_id),
        timeout=settings.ingest_timeout_s,
        resource=(records.DATASET, dataset_id),
    )


def pairset_job_id(pairset_id: str) -> str:
    return f"pairset-{pairset_id}"


def enqueue_pairset(connection: Redis, pairset_id: str, *, settings: Settings) -> Job:
    """Start a pair set's pipeline. HOOK: the API calls this once per created pair set.

    PLACEHOLDER until the pipeline lands: it enqueues `workers.tasks.run_pairset`, which only marks the
    pair set failed with code `not_implemented`. The pipeline replaces this body with the shard jobs
    (gpu queue), a merge job depending on all of them and an export job (cpu queue), all via `enqueue`.
    """
    return enqueue(
        connection,
        settings,
        CPU,
        "workers.tasks.run_pairset",
        pairset_id,
        job_id=pairset_job_id(pairset_id),
        timeout=settings.pairset_timeout_s,
        resource=(records.PAIRSET, pairset_id),
    )


def stop_job(connection: Redis, job_id: str) -> None:
    """Cancel a job that has not started; ask the worker running a started one to stop it (SIGKILL of
    the work horse; the job's on_stopped callback records the outcome). A finished or unknown job is a no-op.
    """
    try:
        job = Job.fetch(job_id, connection=connection)
    except NoSuchJobError:
        return
    status = job.get_status(refresh=False)
    try:
        if status in (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED, JobStatus.CREATED):
            job.cancel()
        elif status == JobStatus.STARTED:
            send_stop_job_command(connection, job_id)
    except InvalidJobOperation:
        pass  # it finished (or was cancelled) in between: nothing left to stop


def stop_pairset(connection: Redis, pairset_id: str) -> None:
    """Stop the jobs of a pair set whose cancel flag is up. HOOK: the pipeline extends it to its shard jobs."""
    stop_job(connection, pairset_job_id(pairset_id))


def queue_stats(connection: Redis) -> dict[str, dict[str, int]]:
    """Jobs per queue and state: queued plus the RQ registries, read without running their cleanup."""
    stats: dict[str, dict[str, int]] = {}
    for name in QUEUES:
        q = get_queue(connection, name)
        row = {"queued": q.count}
        for reg in _REGISTRIES:
            row[reg] = getattr(q, f"{reg}_job_registry").get_job_count(cleanup=False)
        stats[name] = row
    return stats
