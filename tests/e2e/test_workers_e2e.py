"""Workers as real processes: abandoned jobs come back, transient faults are retried then fail the
resource, and `miadpo up` starts and stops the whole stack."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from redis import Redis
from rq.command import send_stop_job_command
from rq.job import Job
from rq.worker import Worker

from cli.services import free_port
from core import jobs, records
from core.settings import Settings
from tests.e2e.conftest import ROOT, redis_db, service_env, wait_for

# Abandoned-job timings scaled down (production: 5 s heartbeats, 15 s grace, 15 s maintenance).
FAST = {
    "MIADPO_WORKER_JOB_MONITORING_INTERVAL_S": "1",
    "MIADPO_WORKER_HEARTBEAT_GRACE_S": "2",
    "MIADPO_WORKER_MAINTENANCE_INTERVAL_S": "2",
    "MIADPO_WORKER_TTL_S": "20",
}


def _job(conn: Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=conn)


def _pids_with_env(marker: str) -> list[int]:
    """Processes whose environment holds `marker` (Linux /proc)."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_job_whose_worker_was_killed_is_rerun_by_another(services, tmp_path: Path, redis_url: str) -> None:
    url = redis_db(redis_url, 2)
    conn = Redis.from_url(url)
    conn.flushdb()
    settings = Settings(data_dir=tmp_path, redis_url=url, job_retry_intervals=[0])
    job = jobs.enqueue(conn, settings, jobs.CPU, "time.sleep", 120, job_id="sleepy", timeout=300)
    assert job.retries_left == 3

    marker = "MIADPO_TEST_WORKER=doomed"
    doomed = services(["worker", "--queues", "cpu"], service_env(tmp_path, url, **FAST, MIADPO_TEST_WORKER="doomed"))
    wait_for(lambda: _job(conn, "sleepy").get_status() == "started", 20, "worker A to start the job")
    first_worker = _job(conn, "sleepy").worker_name
    services(["worker", "--queues", "cpu"], service_env(tmp_path, url, **FAST))
    time.sleep(1.5)  # the survivor is up and idle

    doomed.kill(signal.SIGKILL)  # the worker and its scheduler; its work horse has its own group
    killed_at = time.monotonic()
    # The work horse dies with its worker (PR_SET_PDEATHSIG): the job never runs twice at once.
    wait_for(lambda: not _pids_with_env(marker), 5, "the orphaned work horse to die")

    def rerun_elsewhere() -> bool:
        j = _job(conn, "sleepy")
        return j.get_status() == "started" and j.worker_name not in (None, first_worker)

    wait_for(rerun_elsewhere, 30, "another worker to re-run the abandoned job", interval=0.2)
    elapsed = time.monotonic() - killed_at
    print(f"abandoned job re-run {elapsed:.1f} s after its worker was killed")
    assert elapsed < 20, elapsed
    assert _job(conn, "sleepy").retries_left == 2
    send_stop_job_command(conn, "sleepy")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and SIGKILL")
def test_a_busy_gpu_worker_requeues_a_dead_workers_job(services, tmp_path: Path, redis_url: str) -> None:
    """gpu workers do not fork: while the survivor's only thread of control runs a long job, its heartbeat
    thread must still find the dead worker's job and run its failure callback (which needs a death
    penalty that works outside the main thread)."""
    url = redis_db(redis_url, 6)
    conn = Redis.from_url(url)
    conn.flushdb()
    settings = Settings(data_dir=tmp_path, redis_url=url, job_retry_intervals=[0])
    jobs.enqueue(conn, settings, jobs.GPU, "time.sleep", 60, job_id="busy", timeout=300)
    survivor = services(["worker", "--queues", "gpu"], service_env(tmp_path, url, **FAST))
    wait_for(lambda: _job(conn, "busy").get_status() == "started", 60, "the survivor to start its long job")
    doomed = services(["worker", "--queues", "gpu"], service_env(tmp_path, url, **FAST))
    jobs.enqueue(conn, settings, jobs.GPU, "time.sleep", 60, job_id="abandoned", timeout=300, resource=("dataset", "ds_x"))
    wait_for(lambda: _job(conn, "abandoned").get_status() == "started", 60, "the doomed worker to start its job")
    doomed.kill(signal.SIGKILL)
    killed_at = time.monotonic()

    def requeued() -> bool:
        job = _job(conn, "abandoned")
        return job.get_status() == "queued" and job.retries_left == 2

    wait_for(requeued, 30, "the busy survivor to requeue the abandoned job", interval=0.2)
    print(f"abandoned job requeued {time.monotonic() - killed_at:.1f} s after its worker was killed, by a busy worker")
    assert _job(conn, "busy").get_status() == "started"  # so it was the survivor's heartbeat thread
    events, _ = records.read_events(conn, "ds_x")
    assert [(e["type"], e["data"]["error"]) for e in events] == [("retry", "AbandonedJobError")]
    survivor.kill(signal.SIGKILL)


def _dataset(conn: Redis) -> dict:
    record = records.new_dataset("owner", dataset_id=records.new_id(records.DATASET), name=None, format=None, upload="x")
    return records.create(conn, records.DATASET, record)


def test_transient_failures_are_retried_then_fail_the_dataset_user_errors_are_not(
    services, tmp_path: Path, redis_url: str
) -> None:
    url = redis_db(redis_url, 3)
    conn = Redis.from_url(url)
    conn.flushdb()
    settings = Settings(data_dir=tmp_path, redis_url=url, job_retry_max=2, job_retry_intervals=[0])
    record = _dataset(conn)
    records.update(conn, records.DATASET, record["id"], lambda rec: {k: v for k, v in rec.items() if k != "upload"})
    jobs.enqueue_ingest(conn, record["id"], settings=settings)  # trips over the missing field: our bug, retried
    other = _dataset(conn)
    # Any job raising a UserError (here: a path that leaves its folder) fails its resource without retries.
    jobs.enqueue(conn, settings, jobs.CPU, "core.store.safe_relpath", "../x", job_id="user-error", timeout=60, resource=("dataset", other["id"]))

    worker = services(["worker", "--queues", "cpu", "--burst"], service_env(tmp_path, url))
    assert worker.proc.wait(60) == 0, worker.output()
    failed = records.get(conn, records.DATASET, record["id"])
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "internal_error", "message": "internal error (KeyError); see the worker log"}
    events, _ = records.read_events(conn, record["id"])
    assert [(e["type"], e["data"].get("retries_left")) for e in events] == [("retry", 2), ("retry", 1), ("status", None)]
    assert _job(conn, jobs.ingest_job_id(record["id"])).get_status() == "failed"
    refused = records.get(conn, records.DATASET, other["id"])
    assert refused["status"] == "failed" and refused["error"]["code"] == "invalid_path"
    assert [e["type"] for e in records.read_events(conn, other["id"])[0]] == ["status"]
    assert _job(conn, "user-error").get_status() == "failed"


def test_up_starts_redis_api_and_worker_and_stops_them_all(tmp_path: Path) -> None:
    port = free_port()
    env = service_env(tmp_path / "data", f"redis://127.0.0.1:{free_port()}/0")  # nobody answers there
    log = tmp_path / "up.log"
    with open(log, "wb") as fh:
        up = subprocess.Popen(
            [sys.executable, "-m", "cli", "up", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, 30, "miadpo up to be ready")
            out = log.read_text()
            key = re.search(r"accepts the API key: (\S+)", out).group(1)  # type: ignore[union-attr]
            redis_port = int(re.search(r"started redis-server at redis://127.0.0.1:(\d+)", out).group(1))  # type: ignore[union-attr]
            assert any(p.name.startswith("appendonly") for p in (tmp_path / "data" / "redis").iterdir())  # AOF on
            r = httpx.get(f"{base}/v1/datasets", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            up_redis = Redis(port=redis_port)
            wait_for(lambda: len(up_redis.smembers("rq:workers")) == 2, 30, "the worker and the trainer to register")
            queues = sorted(",".join(q.name for q in w.queues) for w in Worker.all(connection=up_redis))
            assert queues == ["cpu,gpu", "train"]
            up.send_signal(signal.SIGTERM)
            assert up.wait(30) == 0, log.read_text()
        finally:
            if up.poll() is None:
                up.kill()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz")
    with pytest.raises(Exception, match="[Cc]onnect"):
        Redis(port=redis_port, socket_connect_timeout=1).ping()
    assert "Ctrl-C stops" in log.read_text()
