"""RQ queues and the one place that enqueues jobs (DESIGN 3.2).

Queues by what a job needs: `cpu` (ingest, augmentation, merge, export), `gpu` (generation and the
attention pass), `train`. Job functions are named by import path, so core never imports the workers.
Every job gets an explicit id derived from its resource (a job for a resource is found without a lookup
table), a timeout, `Retry` with backoff for faults that may pass, and `job.meta["resource"]` so the
failure and stop callbacks (`workers.tasks`) know which record to update when a job dies for good.
"""

from __future__ import annotations

import contextlib
from typing import Any

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Callback, Queue, Retry
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Dependency, Job, JobStatus

from core import records
from core.errors import UserError
from core.settings import Settings

CPU, GPU, TRAIN = "cpu", "gpu", "train"
QUEUES = (CPU, GPU, TRAIN)
# Fair scheduling between keys (DESIGN 7): the shards of a key's pair sets and evaluations go to that key's
# own gpu queue, `gpu.{owner[:16]}`, listed in this set; gpu workers serve `gpu` and every such queue round
# robin (`cli.services.FairQueuesMixin`), so a key's small pair set does not wait behind another's large one.
KEY_QUEUE_PREFIX = f"{GPU}."
KEY_QUEUES = "miadpo:gpu-key-queues"
# What a Redis that is down, restarting or cut off raises (after redis-py's own few quick retries).
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)

_FAILURE_CALLBACK = "workers.tasks.on_job_failure"
_STOPPED_CALLBACK = "workers.tasks.on_job_stopped"
_RESULT_TTL_S = 24 * 3600
_FAILURE_TTL_S = 7 * 24 * 3600
_REGISTRIES = ("started", "scheduled", "deferred", "finished", "failed", "canceled")


def key_queue_name(owner: str) -> str:
    """The gpu queue of one key's shards."""
    return f"{KEY_QUEUE_PREFIX}{owner[:16]}"


def key_queue_names(connection: Redis) -> list[str]:
    """Every per-key gpu queue a shard was ever enqueued on (one per key: the set stays small), sorted."""
    return sorted(n.decode() if isinstance(n, bytes) else n for n in connection.smembers(KEY_QUEUES))


def get_queue(connection: Redis, name: str) -> Queue:
    """One of the project's queues (or a key's gpu queue)."""
    if name not in QUEUES and not name.startswith(KEY_QUEUE_PREFIX):
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
    depends_on: Job | str | list[Job | str] | Dependency | None = None,
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


def start_job_id(kind: str, resource_id: str) -> str:
    return f"{kind}-{resource_id}"


def shard_job_id(kind: str, resource_id: str, index: int) -> str:
    return f"{kind}-{resource_id}-shard-{index:05d}"


def merge_job_id(kind: str, resource_id: str) -> str:
    return f"{kind}-{resource_id}-merge"


def sharded_job_ids(kind: str, resource_id: str, num_shards: int) -> list[str]:
    """Every job of a sharded job (pair set, evaluation): the start job, its shard jobs, the merge."""
    shards = [shard_job_id(kind, resource_id, i) for i in range(num_shards)]
    return [start_job_id(kind, resource_id), *shards, merge_job_id(kind, resource_id)]


def pairset_job_id(pairset_id: str) -> str:
    return start_job_id(records.PAIRSET, pairset_id)


def pairset_shard_job_id(pairset_id: str, index: int) -> str:
    return shard_job_id(records.PAIRSET, pairset_id, index)


def pairset_merge_job_id(pairset_id: str) -> str:
    return merge_job_id(records.PAIRSET, pairset_id)


def pairset_job_ids(pairset_id: str, num_shards: int) -> list[str]:
    """Every job of a pair set: the start job, its shard jobs, the merge."""
    return sharded_job_ids(records.PAIRSET, pairset_id, num_shards)


def enqueue_pairset(connection: Redis, pairset_id: str, *, settings: Settings) -> Job:
    """Start a pair set's pipeline: `workers.tasks.run_pairset` (cpu) checks it and enqueues its shards
    and merge (`enqueue_pairset_shards`). The API calls this once per created pair set."""
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


def _enqueue_once(
    connection: Redis, settings: Settings, queue_name: str, func: str, *args: Any, job_id: str, **kwargs: Any
) -> Job:
    """`enqueue`, unless a job with this id exists already: a re-run of the job that enqueues (its
    worker died half-way) must not run a shard twice, nor reset one that is running or done."""
    try:
        return Job.fetch(job_id, connection=connection)
    except NoSuchJobError:
        return enqueue(connection, settings, queue_name, func, *args, job_id=job_id, **kwargs)


def _enqueue_shards(
    connection: Redis,
    kind: str,
    resource_id: str,
    num_shards: int,
    *,
    shard_func: str,
    merge_func: str,
    timeout: int,
    settings: Settings,
) -> list[Job]:
    """A sharded job's graph (pair sets, evaluations): one `shard_func(id, i)` job per shard on the owner's
    gpu queue (`key_queue_name`), then `merge_func(id)` on the cpu queue once every shard has succeeded.

    A shard that fails for good never lets the merge run (`allow_failure=False`): the merge would wait
    in RQ's deferred registry for ever, so the shard's failure callback fails the resource and stops
    the merge. Returns the shard jobs and the merge job, in that order.
    """
    resource = (kind, resource_id)
    record = records.find(connection, kind, resource_id)
    queue = key_queue_name(record["owner"]) if record and record.get("owner") else GPU
    if queue != GPU:
        # Listed before the first shard is pushed: a worker that refreshes its queues between the two would
        # otherwise not see the queue until its next refresh (bounded, but a shard's time later).
        connection.sadd(KEY_QUEUES, queue)
    shards = [
        _enqueue_once(
            connection,
            settings,
            queue,
            shard_func,
            resource_id,
            i,
            job_id=shard_job_id(kind, resource_id, i),
            timeout=timeout,
            resource=resource,
        )
        for i in range(num_shards)
    ]
    merge = _enqueue_once(
        connection,
        settings,
        CPU,
        merge_func,
        resource_id,
        job_id=merge_job_id(kind, resource_id),
        timeout=timeout,
        resource=resource,
        depends_on=Dependency(jobs=shards, allow_failure=False),
    )
    return [*shards, merge]


def enqueue_pairset_shards(
    connection: Redis, pairset_id: str, num_shards: int, *, settings: Settings
) -> list[Job]:
    """The pair set's job graph: `workers.tasks.run_pairset_shard` per shard, then `workers.tasks.merge_pairset`."""
    return _enqueue_shards(
        connection,
        records.PAIRSET,
        pairset_id,
        num_shards,
        shard_func="workers.tasks.run_pairset_shard",
        merge_func="workers.tasks.merge_pairset",
        timeout=settings.pairset_timeout_s,
        settings=settings,
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


def stop_sharded(connection: Redis, kind: str, resource_id: str, *, skip: tuple[str, ...] = ()) -> None:
    """Stop every job of a sharded job (pair set, evaluation) that is cancelled (or failed): queued ones
    (shards, the deferred merge) are cancelled; running ones are asked to stop. A shard on a `gpu` worker
    (non-forking) stops at its next batch, when it sees the cancel flag or that its resource has finished.
    `skip`: job ids to leave alone (the job whose own failure callback is calling).
    """
    record = records.find(connection, kind, resource_id)
    num_shards = int(record.get("num_shards") or 0) if record else 0
    start, *shards, merge = sharded_job_ids(kind, resource_id, num_shards)
    # The merge first: once it is cancelled, no shard finishing now can make it run.
    for job_id in (start, merge, *shards):
        if job_id not in skip:
            stop_job(connection, job_id)


def stop_pairset(connection: Redis, pairset_id: str, *, skip: tuple[str, ...] = ()) -> None:
    """`stop_sharded` for a pair set."""
    stop_sharded(connection, records.PAIRSET, pairset_id, skip=skip)


def enqueue_evaluation(connection: Redis, evaluation_id: str, *, settings: Settings) -> Job:
    """Start an evaluation: `workers.tasks.run_evaluation` (cpu) checks it and enqueues its shards and merge."""
    return _enqueue_once(
        connection,
        settings,
        CPU,
        "workers.tasks.run_evaluation",
        evaluation_id,
        job_id=start_job_id(records.EVALUATION, evaluation_id),
        timeout=settings.pairset_timeout_s,
        resource=(records.EVALUATION, evaluation_id),
    )


def enqueue_evaluation_shards(connection: Redis, evaluation_id: str, num_shards: int, *, settings: Settings) -> list[Job]:
    """The evaluation's job graph: `workers.tasks.run_evaluation_shard` per shard, then `workers.tasks.merge_evaluation`."""
    return _enqueue_shards(
        connection,
        records.EVALUATION,
        evaluation_id,
        num_shards,
        shard_func="workers.tasks.run_evaluation_shard",
        merge_func="workers.tasks.merge_evaluation",
        timeout=settings.pairset_timeout_s,
        settings=settings,
    )


def create_training_evaluations(connection: Redis, training_id: str, *, settings: Settings) -> dict[str, str]:
    """The two evaluations a training's `evaluation` asks for once it has succeeded, enqueued: the base
    model and the trained adapter, on the same prompts. Idempotent: a re-run finds the same two.
    Returns {"base": id, "adapter": id}."""
    training = records.get(connection, records.TRAINING, training_id)
    spec = (training.get("evaluation") or {}).get("request")
    if not spec:
        raise UserError(f"training {training_id} asked for no evaluation", code="no_evaluation_requested", param="evaluation")
    fresh = {role: records.new_id(records.EVALUATION) for role in ("base", "adapter")}
    ids = records.link_evaluations(connection, training_id, fresh)
    for role, evaluation_id in ids.items():
        if records.find(connection, records.EVALUATION, evaluation_id) is None:
            record = records.new_evaluation(
                training["owner"],
                model=training["model"],
                dataset_id=spec["dataset_id"],
                config={**spec, "model": training["model"], "training_id": training_id if role == "adapter" else None},
                training_id=training_id if role == "adapter" else None,
                report_to=(training_id, role),
            )
            record["id"] = evaluation_id
            records.create(connection, records.EVALUATION, record)
            records.append_event(connection, evaluation_id, "created", {"status": "queued", "training_id": training_id, "role": role})
        enqueue_evaluation(connection, evaluation_id, settings=settings)
    return ids


def training_job_id(training_id: str) -> str:
    return f"training-{training_id}"


def enqueue_training(connection: Redis, training_id: str, *, settings: Settings) -> Job:
    """Run a training (`trainer.tasks.run_training_job`) on the train queue, under `training_timeout_s`.
    A job that exists already (queued, running or done) is left as it is: one training never runs twice."""
    return _enqueue_once(
        connection,
        settings,
        TRAIN,
        "trainer.tasks.run_training_job",
        training_id,
        job_id=training_job_id(training_id),
        timeout=settings.training_timeout_s,
        resource=(records.TRAINING, training_id),
    )


def enqueue_training_for_pairset(connection: Redis, pairset_id: str, *, settings: Settings) -> str:
    """Start the training that a pair set's `train` asked for (its merge job calls this once the pairs are
    exported): `create_training_for_pairset`, then the job. Returns the training's id.

    Idempotent: a re-run of the caller finds the same training, and enqueues its job only if it has none.

    Raises:
        NotFoundError: no such pair set.
        UserError: the pair set asked for no training.
    """
    training_id = create_training_for_pairset(connection, pairset_id)
    enqueue_training(connection, training_id, settings=settings)
    return training_id


def create_training_for_pairset(connection: Redis, pairset_id: str) -> str:
    """The `queued` training record that a pair set's `train` asks for, without its job: owned by the
    pair set's owner, from `train` (hyperparameters, checkpoint_every, model; default model: the pair
    set's), its id kept on the pair set (`training_id`) with a `training_created` event there. The merge
    job calls this just before it marks the pair set succeeded, and enqueues the job just after.

    Idempotent: the pair set keeps the id (`records.link_training`), so a second call returns the same
    training (and creates its record only if it is missing).
    """
    pairset = records.get(connection, records.PAIRSET, pairset_id)
    train = pairset["config"].get("train")
    if not train:
        raise UserError(f"pair set {pairset_id} asked for no training", code="no_training_requested", param="train")
    training_id = records.link_training(connection, pairset_id, records.new_id(records.TRAINING))
    if records.find(connection, records.TRAINING, training_id) is None:
        record = records.new_training(
            pairset["owner"],
            pairset_id=pairset_id,
            model=train.get("model") or pairset["model"],
            hyperparameters=dict(train.get("hyperparameters") or {}),
            preset=train.get("preset", "paper"),
            evaluation=train.get("evaluation"),
            checkpoint_every=train["checkpoint_every"],
            training_id=training_id,
        )
        records.create(connection, records.TRAINING, record)
        records.append_event(connection, training_id, "created", {"status": "queued", "pairset_id": pairset_id})
        records.append_event(connection, pairset_id, "training_created", {"training_id": training_id})
    return training_id


def stop_training(connection: Redis, training_id: str) -> None:
    """Drop the job of a cancelled training if it has not started (queued, or waiting for a retry).

    A running one is not killed: it sees the cancel flag after its current optimizer step and saves a
    checkpoint of that step before it stops (a kill would lose every step since the last checkpoint).
    """
    try:
        job = Job.fetch(training_job_id(training_id), connection=connection)
    except NoSuchJobError:
        return
    if job.get_status(refresh=False) in (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED, JobStatus.CREATED):
        with contextlib.suppress(InvalidJobOperation):
            job.cancel()


def queue_stats(connection: Redis) -> dict[str, dict[str, int]]:
    """Jobs per queue and state: queued plus the RQ registries, read without running their cleanup (the keys'
    gpu queues added up under `gpu`)."""
    stats: dict[str, dict[str, int]] = {}
    for name in (*QUEUES, *key_queue_names(connection)):
        q = get_queue(connection, name)
        row = {"queued": q.count}
        for reg in _REGISTRIES:
            row[reg] = getattr(q, f"{reg}_job_registry").get_job_count(cleanup=False)
        shown = GPU if name.startswith(KEY_QUEUE_PREFIX) else name  # the keys' queues count as gpu
        stats[shown] = {k: stats.get(shown, {}).get(k, 0) + v for k, v in row.items()}
    return stats
