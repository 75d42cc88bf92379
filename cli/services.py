"""The long-running services behind `miadpo api`, `miadpo worker` and `miadpo up` (DESIGN 3.5).

Abandoned jobs (a worker SIGKILLed, OOM-killed, or its machine gone) are re-run within a minute:

RQ 3 keeps a running job in the queue's StartedJobRegistry with an expiry score that the worker pushes
forward on every heartbeat: every `job_monitoring_interval` seconds while the work horse runs, to
`now + min(interval, time left) + 60`. Some live worker's maintenance (every `maintenance_interval`,
default 10 minutes) runs `StartedJobRegistry.cleanup()`, which retries (if the job has retries left,
and ours always do) or fails every job whose score has passed. Defaults: a dead worker's job comes
back after 10-12 minutes. `MiadpoWorker` tightens every term, from the settings:

    heartbeat every  worker_job_monitoring_interval_s  (5 s)
    expiry grace     worker_heartbeat_grace_s           (15 s, instead of RQ's fixed 60 s)
    maintenance      worker_maintenance_interval_s      (15 s), also while the worker is busy with a job
    idle wake-up     worker_ttl_s - 15                  (15 s: an idle worker blocks this long per poll)

Worst case from the last heartbeat: 5 + 15 s until the entry expires, at most 15 + 15 s until a live
worker's maintenance notices, then the first retry interval (5 s) and the scheduler's 1 s tick: under
a minute. Each retry uses up one of `job_retry_max`, and the failure callback records a `retry` event.
A work horse killed under a live worker (OOM) is caught at once by its worker; RQ then retries it
without calling the failure callback, so `MiadpoWorker` calls it (the resource is failed once retries
run out). A work horse dies with its worker (PR_SET_PDEATHSIG): a job is never run twice at once.

A worker serving the `gpu` queue is a `MiadpoSimpleWorker`: RQ's non-forking worker, so that the model
a shard job loads stays loaded for the next shard (`workers.tasks` caches it per process). It has the
same timings (`FastRecoveryMixin`); with no work horse to watch, a thread of its own heartbeats the
running job and runs the registry maintenance. Stopping one of its jobs is cooperative: the job checks
its pair set's cancel flag between batches (RQ's stop command only marks the job as stopped).

Redis going away (a restart, a failover, a network cut) never ends a worker or the trainer (DESIGN 7).
RQ 3 backs off only inside its dequeue loop; everywhere else a refused connection ends `Worker.work()`,
and `Worker()` itself talks to Redis. `RideOutRedisOutages` covers the rest: start-up and registration
wait with logged backoff (0.5 s doubling to `redis_backoff_max_s`), heartbeats and maintenance that fail
are logged and tried again on the next tick (a forked job keeps running meanwhile), and a job whose end
cannot be recorded stays in the started registry, so once Redis is back the abandoned-job recovery above
re-runs it (jobs are idempotent). `serve_worker` builds a new worker if the loop ends anyway without a
stop request. With AOF on (docker-compose, `miadpo up`) Redis comes back with every queued and started
job: none is lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import SimpleWorker, Worker
from rq.callbacks import execute_failure_callback
from rq.exceptions import AbandonedJobError
from rq.registry import StartedJobRegistry
from rq.timeouts import TimerDeathPenalty
from rq.utils import now as rq_now
from rq.worker import WorkerStatus

from core.errors import FatalError
from core.jobs import CPU, GPU, QUEUES, REDIS_DOWN, TRAIN, get_queue, key_queue_names
from core.process import die_with_parent, free_port
from core.settings import Settings

log = logging.getLogger(__name__)

_STOP_GRACE_S = 10.0
_FIRST_BACKOFF_S = 0.5


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# --------------------------------------------------------------------------------------------------
# api


def run_api(settings: Settings, *, host: str, port: int) -> int:
    """Serve the HTTP API with uvicorn until interrupted."""
    import uvicorn

    from app.main import create_app

    configure_logging(settings)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=settings.log_level.lower())
    return 0


# --------------------------------------------------------------------------------------------------
# worker


def redis_address(connection: Redis) -> str:
    """host:port (or socket path) of a client, for logs: never the URL, which may hold a password."""
    kwargs = connection.connection_pool.connection_kwargs
    return str(kwargs.get("path") or f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}")


def wait_for_redis(connection: Redis, what: str, *, max_delay_s: float, stop: Callable[[], bool] = lambda: False) -> bool:
    """Block until Redis answers a PING, logging each failed try and the wait before the next one
    (0.5 s, doubling, at most `max_delay_s`). False if `stop()` turned true while waiting."""
    delay, failures = _FIRST_BACKOFF_S, 0
    while True:
        try:
            connection.ping()
        except REDIS_DOWN as exc:
            failures += 1
            log.warning("%s: Redis at %s unreachable (%s); try %d again in %.1f s",
                        what, redis_address(connection), exc, failures + 1, delay)
        else:
            if failures:
                log.info("%s: Redis at %s answers again after %d failed tries", what, redis_address(connection), failures)
            return True
        if stop():
            return False
        time.sleep(delay)
        delay = min(delay * 2, max_delay_s)


class RideOutRedisOutages:
    """Keeps an RQ worker alive through Redis outages (see the module docstring); mixed in first.

    Start-up and registration wait for Redis; heartbeats, state changes and maintenance that fail are
    logged and skipped (the next tick tries again); a job whose run or end could not be recorded is left
    to the abandoned-job recovery. Nothing here changes what happens while Redis answers.
    """

    redis_backoff_max_s = 30.0
    stop_signalled = False  # SIGINT/SIGTERM or RQ's shutdown command: the only way out of `serve_worker`
    connection: Redis
    log: logging.Logger
    name: str
    key: str

    def _wait_for_redis(self, what: str) -> None:
        wait_for_redis(self.connection, f"worker {self.name}: {what}", max_delay_s=self.redis_backoff_max_s)

    def _skipped(self, what: str, exc: Exception) -> None:
        self.log.warning("Worker %s: %s skipped, Redis at %s unreachable (%s)", self.name, what,
                         redis_address(self.connection), exc)

    def request_stop(self, signum: Any, frame: Any) -> None:
        self.stop_signalled = True
        super().request_stop(signum, frame)  # type: ignore[misc]

    def register_birth(self) -> None:
        retry = False
        while True:
            try:
                if retry:  # a try whose answer was lost may have registered this (unique) name already
                    self.connection.delete(self.key)
                super().register_birth()  # type: ignore[misc]
                return
            except REDIS_DOWN:
                self._wait_for_redis("registration")
                retry = True

    def subscribe(self) -> None:
        while True:
            try:
                super().subscribe()  # type: ignore[misc]
                return
            except REDIS_DOWN:
                self._wait_for_redis("subscribing to its command channel")

    def check_for_suspension(self, burst: bool) -> None:
        while True:
            try:
                super().check_for_suspension(burst)  # type: ignore[misc]
                return
            except REDIS_DOWN:
                self._wait_for_redis("suspension check")

    def set_state(self, state: str, pipeline: Any = None) -> None:
        try:
            super().set_state(state, pipeline)  # type: ignore[misc]
        except REDIS_DOWN as exc:  # the state is kept in the process as well; the next change writes it
            self._skipped(f"recording state {state!r}", exc)

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        try:
            super().heartbeat(timeout, pipeline)  # type: ignore[misc]
        except REDIS_DOWN as exc:
            self._skipped("heartbeat", exc)

    def maintain_heartbeats(self, job: Any, execution: Any) -> None:
        try:
            super().maintain_heartbeats(job, execution)  # type: ignore[misc]
        except REDIS_DOWN as exc:  # the job runs on; if Redis stays away past the grace, it is re-run
            self._skipped(f"heartbeat of job {job.id}", exc)

    def run_maintenance_tasks(self) -> None:
        try:
            super().run_maintenance_tasks()  # type: ignore[misc]
        except REDIS_DOWN as exc:
            self._skipped("maintenance", exc)

    def execute_job(self, job: Any, queue: Any) -> None:
        try:
            super().execute_job(job, queue)  # type: ignore[misc]
        except REDIS_DOWN as exc:
            # The job (or its result) could not be recorded. It is still in the started registry (AOF):
            # once Redis is back and its heartbeat has lapsed, the abandoned-job recovery runs it again.
            self.log.error("Worker %s: Redis at %s went away during job %s (%s); the job will be re-run",
                           self.name, redis_address(self.connection), job.id, exc)
            if getattr(self, "horse_pid", 0):  # never leave a forked job running unwatched
                self.kill_horse()  # type: ignore[attr-defined]
                self.wait_for_horse()  # type: ignore[attr-defined]
            self._wait_for_redis(f"after job {job.id}")

    def register_death(self) -> None:
        try:
            super().register_death()  # type: ignore[misc]
        except REDIS_DOWN as exc:  # the worker's key expires by itself (worker_ttl)
            self._skipped("unregistering", exc)

    def unsubscribe(self) -> None:
        try:
            super().unsubscribe()  # type: ignore[misc]
        except REDIS_DOWN as exc:
            self._skipped("unsubscribing", exc)
            # RQ's pubsub thread would otherwise go on trying to reconnect for the life of the process.
            thread = getattr(self, "pubsub_thread", None)
            if thread is not None:
                thread.stop()
                thread.join(timeout=1)


class FastRecoveryMixin:
    """The abandoned-job timings shared by our workers (see the module docstring); mixed in before RQ's class."""

    heartbeat_grace_s = 15
    job_monitoring_interval: int

    def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
        # RQ adds a fixed 60 s to every heartbeat (SimpleWorker: the whole job timeout); that margin is
        # what decides how long a dead worker's job stays "started". A few missed heartbeats' worth is enough.
        if job.timeout and job.timeout > 0:
            left = max(1, int(job.timeout - working_time))
            return min(left, self.job_monitoring_interval) + self.heartbeat_grace_s
        return self.job_monitoring_interval + self.heartbeat_grace_s

    def maintain_heartbeats(self, job: Any, execution: Any) -> None:
        super().maintain_heartbeats(job, execution)  # type: ignore[misc]
        # RQ runs maintenance only between jobs: with every worker busy on long jobs, nobody would look
        # for a dead worker's job until one of them finished.
        if self.should_run_maintenance_tasks:  # type: ignore[attr-defined]
            self.maintenance_while_busy()

    def maintenance_while_busy(self) -> None:
        self.run_maintenance_tasks()  # type: ignore[attr-defined]


class MiadpoWorker(RideOutRedisOutages, FastRecoveryMixin, Worker):
    """RQ's forking worker, tuned so that abandoned jobs come back fast (see the module docstring)."""

    def handle_work_horse_killed(self, job: Any, retpid: Any, ret_val: Any, rusage: Any) -> None:
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        # RQ fails (or retries) such a job without its failure callback; ours keeps the record in step.
        exc = AbandonedJobError(f"work horse of job {job.id} died (wait status {ret_val})")
        try:
            execute_failure_callback(job, self.death_penalty_class, AbandonedJobError, exc, None)
        except Exception:
            self.log.exception("failure callback of job %s raised", job.id)

    def main_work_horse(self, job: Any, queue: Any) -> None:
        die_with_parent()
        super().main_work_horse(job, queue)


class HeartbeatThreadWorker(SimpleWorker):
    """RQ's non-forking worker, with a heartbeat thread standing in for the forking worker's horse monitor."""

    def execute_job(self, job: Any, queue: Any) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.job_monitoring_interval):
                try:
                    self.maintain_heartbeats(job, execution)
                except Exception:  # a Redis blip: the next beat tries again
                    self.log.exception("heartbeat of job %s failed", job.id)

        thread = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
        thread.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            thread.join()
        self.set_state(WorkerStatus.IDLE)


class FairQueuesMixin:
    """Serve the `--queues` given plus, with `gpu`, every key's gpu queue (`core.jobs.key_queue_name`), round
    robin: after a job from one queue, the next is taken from the queue after it, so each key with shards
    waiting gets one shard in turn, whatever another key has queued. The list of keys' queues is read again
    before each dequeue, and an idle worker looks again every `fair_poll_s`."""

    fair_poll_s = 2
    _base_queue_names: tuple[str, ...] = ()
    _last_served: str | None = None

    def _refresh_queues(self) -> None:
        names = list(self._base_queue_names)
        if GPU in names:
            try:
                keys = key_queue_names(self.connection)  # type: ignore[attr-defined]
            except REDIS_DOWN:
                # Redis is away: keep the queues we had; RQ's dequeue below waits for it to come back.
                keys = [q.name for q in self.queues if q.name not in names]  # type: ignore[attr-defined]
            names += [n for n in keys if n not in names]
        if self._last_served in names:
            at = names.index(self._last_served) + 1
            names = names[at:] + names[:at]
        queues = [get_queue(self.connection, n) for n in names]  # type: ignore[attr-defined]
        self.queues = queues  # type: ignore[assignment]
        self._ordered_queues = queues[:]  # type: ignore[assignment]

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        if not self._base_queue_names:
            self._base_queue_names = tuple(q.name for q in self.queues)  # type: ignore[attr-defined]
        started = time.monotonic()
        while True:
            self._refresh_queues()
            if timeout is None:  # burst: one look, no waiting
                result = super().dequeue_job_and_maintain_ttl(None, max_idle_time)  # type: ignore[misc]
            else:
                # Wait at most fair_poll_s at a time, so that a key's new queue is seen while idle.
                wait = self.fair_poll_s if max_idle_time is None else max(1, min(self.fair_poll_s, max_idle_time - int(time.monotonic() - started)))
                result = super().dequeue_job_and_maintain_ttl(wait, wait)  # type: ignore[misc]
            if result is not None:
                self._last_served = result[1].name
                return result
            if timeout is None or (max_idle_time is not None and time.monotonic() - started >= max_idle_time):
                return None
            if getattr(self, "_stop_requested", False):
                return None


class MiadpoSimpleWorker(RideOutRedisOutages, FastRecoveryMixin, FairQueuesMixin, HeartbeatThreadWorker):
    """RQ's non-forking worker with the same timings: jobs run in this process, so what they cache (a
    loaded model) outlives them."""

    def maintenance_while_busy(self) -> None:
        # From the heartbeat thread, only what finds a dead worker's job: the started-job registries. Their
        # cleanup runs the failure callback under a death penalty, and RQ's default one (SIGALRM) works only
        # in the main thread, which is running the job: a timer-based one works here. The rest of the
        # maintenance (other registries, the scheduler check, which may fork) waits for the main loop.
        for queue in self.queues:
            if queue.acquire_maintenance_lock():
                try:
                    StartedJobRegistry(
                        queue.name,
                        connection=self.connection,
                        job_class=self.job_class,
                        serializer=self.serializer,
                        death_penalty_class=TimerDeathPenalty,
                    ).cleanup(exception_handlers=self._exc_handlers)
                finally:
                    queue.release_maintenance_lock()
        self.last_cleaned_at = rq_now()  # type: ignore[assignment]


def make_worker(
    settings: Settings, queues: list[str], connection: Redis | None = None
) -> MiadpoWorker | MiadpoSimpleWorker:
    """A worker on `queues` with the abandoned-job timings from `settings`: non-forking when it serves
    `gpu` (the model stays loaded between shard jobs), forking otherwise."""
    unknown = [q for q in queues if q not in QUEUES]
    if not queues or unknown:
        raise ValueError(f"--queues must be a comma list of {', '.join(QUEUES)}, got {','.join(queues)!r}")
    connection = connection or Redis.from_url(settings.redis_url)
    worker_class = MiadpoSimpleWorker if GPU in queues else MiadpoWorker
    while True:
        try:  # RQ's Worker() names its Redis client: it needs Redis already
            worker = worker_class(
                [get_queue(connection, q) for q in queues],
                connection=connection,
                worker_ttl=settings.worker_ttl_s,
                job_monitoring_interval=settings.worker_job_monitoring_interval_s,
                maintenance_interval=settings.worker_maintenance_interval_s,
            )
            break
        except REDIS_DOWN:
            wait_for_redis(connection, f"worker on {','.join(queues)}: start-up", max_delay_s=settings.redis_backoff_max_s)
    worker.heartbeat_grace_s = settings.worker_heartbeat_grace_s
    worker.redis_backoff_max_s = settings.redis_backoff_max_s
    worker.max_connection_wait_time = settings.redis_backoff_max_s  # RQ's own backoff while dequeuing
    return worker


def serve_worker(settings: Settings, queues: list[str], *, burst: bool = False) -> int:
    """Run a worker on `queues` until it is asked to stop (SIGTERM: after the current job; a second
    SIGTERM: at once) or, with `burst`, until the queues are empty. Waits for Redis to answer first, and
    builds a new worker if one leaves its loop unasked (RQ ends it on errors it does not expect)."""
    connection = Redis.from_url(settings.redis_url)
    what = f"worker on {','.join(queues)}"
    delay = _FIRST_BACKOFF_S
    while True:
        wait_for_redis(connection, f"{what}: start-up", max_delay_s=settings.redis_backoff_max_s)
        worker = make_worker(settings, queues, connection)
        try:
            # The scheduler moves retries with a backoff interval back to their queue when they are due.
            worker.work(burst=burst, with_scheduler=True, logging_level=settings.log_level.upper())
        except REDIS_DOWN as exc:  # from the few steps of work() outside its loop (starting the scheduler)
            log.error("%s: worker %s lost Redis outside its loop (%s)", what, worker.name, exc)
        else:
            if burst or worker.stop_signalled:
                return 0
        log.error("%s: worker %s left its loop without being asked to stop (see above); starting a new one in %.1f s",
                  what, worker.name, delay)
        time.sleep(delay)
        delay = min(delay * 2, settings.redis_backoff_max_s)


def run_worker(settings: Settings, queues: list[str], *, burst: bool = False) -> int:
    """Work on `queues` until SIGTERM (finish the current job) or a second SIGTERM (stop it)."""
    configure_logging(settings)
    import workers.tasks  # noqa: F401  (imported once here, so every forked job starts warm)

    return serve_worker(settings, queues, burst=burst)


def run_trainer(settings: Settings, *, burst: bool = False) -> int:
    """The trainer (DESIGN 3.3): a forking `MiadpoWorker` on the `train` queue only, one training at a time.

    Forking, unlike the gpu worker: each training runs in a fresh work horse, so all its (GPU) memory is
    given back when it ends, and a horse that dies (SIGKILL, OOM) is caught at once by its worker, a
    trainer that dies by the abandoned-job timings above. Either way the retry resumes the training from
    its latest complete checkpoint (`trainer.tasks`). SIGTERM waits for the running training to finish;
    a trainer killed before that (a container stop) loses only the steps since its last checkpoint.
    """
    configure_logging(settings)
    # torch, transformers, TRL and peft imported once here, so every forked training starts warm.
    import peft  # noqa: F401
    import trl  # noqa: F401

    import trainer.tasks  # noqa: F401
    import trainer.train  # noqa: F401
    import workers.tasks  # noqa: F401  (the job callbacks)

    return serve_worker(settings, [TRAIN], burst=burst)


# --------------------------------------------------------------------------------------------------
# up


def _redis_answers(url: str) -> bool:
    try:
        return bool(Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except (RedisError, OSError, ValueError):
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_redis(data_dir: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start `redis-server` from PATH with its files (AOF on) under `data_dir/redis`; wait until it answers."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise FatalError("redis-server is not on PATH", code="no_redis")
    port = port or (6379 if _port_free(6379) else free_port())
    folder = data_dir / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "--dir", str(folder), "--appendonly", "yes", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not _redis_answers(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop([proc])
            raise FatalError(f"redis-server did not start on port {port}", code="no_redis")
        time.sleep(0.05)
    return proc, url


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group (in order), wait a little, then SIGKILL what is left."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE_S
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what is left of its group (e.g. RQ's scheduler)
        proc.wait()


def run_up(settings: Settings, *, host: str, port: int, data_dir: Path | None = None) -> int:
    """The whole stack on one machine: Redis (REDIS_URL if it answers, else our own), the API, one
    worker for the cpu and gpu queues and the trainer (train queue), each in its own process; Ctrl-C or
    SIGTERM stops everything started here."""
    configure_logging(settings)
    data_dir = (data_dir or settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MIADPO_DATA_DIR=str(data_dir))
    started: list[subprocess.Popen] = []
    stop_requested = False

    def request_stop(signum: int, frame: Any) -> None:
        nonlocal stop_requested
        stop_requested = True

    old_handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    rc = 0
    try:
        redis_url = settings.redis_url
        if not _redis_answers(redis_url):
            if shutil.which("redis-server") is None:
                raise FatalError(
                    f"no Redis answers at {redis_url} and redis-server is not on PATH: "
                    "install Redis (apt-get install redis-server) or set REDIS_URL to a running one",
                    code="no_redis",
                )
            proc, redis_url = start_redis(data_dir)
            started.append(proc)
            print(f"started redis-server at {redis_url} (data in {data_dir / 'redis'})", flush=True)
        # Both names: MIADPO_REDIS_URL wins over REDIS_URL, and either may be set in our environment.
        env["REDIS_URL"] = env["MIADPO_REDIS_URL"] = redis_url
        if not settings.api_keys:
            key = secrets.token_urlsafe(24)
            env["MIADPO_API_KEYS"] = key
            print(f"MIADPO_API_KEYS is not set; this run accepts the API key: {key}", flush=True)
        cli = [sys.executable, "-m", "cli"]
        started.append(subprocess.Popen([*cli, "api", "--host", host, "--port", str(port)], env=env, start_new_session=True))
        started.append(subprocess.Popen([*cli, "worker", "--queues", f"{CPU},{GPU}"], env=env, start_new_session=True))
        started.append(subprocess.Popen([*cli, "trainer"], env=env, start_new_session=True))
        print(f"miadpo up: API on http://{host}:{port} (viewer: http://{host}:{port}/ui/), worker on {CPU},{GPU}, trainer on {TRAIN}; Ctrl-C stops", flush=True)
        while not stop_requested:
            dead = [p for p in started if p.poll() is not None]
            if dead:
                print(f"miadpo up: {dead[0].args!r} exited with {dead[0].returncode}; stopping", flush=True)
                rc = 1
                break
            time.sleep(0.2)
    finally:
        _stop(list(reversed(started)))  # worker and API before the Redis they use
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    return rc
