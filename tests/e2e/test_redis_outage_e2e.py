"""Redis goes away and comes back (DESIGN 7): a redis-server of the test's own with AOF on, SIGKILLed and
restarted on the same port and files. Workers, the trainer and the API ride the outage out as processes:
none exits, the API answers 503 meanwhile and recovers by itself, no job is lost, and a pair set that was
running gives the same pairs as an undisturbed one."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis
from rq.job import Job

from cli.services import _stop, free_port, start_redis
from core import jobs, records
from core.client import zip_folder
from core.settings import Settings
from tests.e2e.conftest import service_env, wait_for
from tests.e2e.test_pairsets_e2e import _rows
from tests.e2e.test_workers_e2e import FAST
from workers.sample_data import write_sample_data

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and SIGKILL")

KEY = "e2e-outage-key"
A = {"Authorization": f"Bearer {KEY}"}
# Backoff capped at 1 s (production: 30 s), so the services notice Redis is back at once.
OUTAGE = {**FAST, "MIADPO_REDIS_BACKOFF_MAX_S": "1", "MIADPO_JOB_RETRY_INTERVALS": "0", "MIADPO_DEVICE": "cpu"}
CONFIG = {"augmentation": {"num": 8}, "generation": {"max_new_tokens": 4, "batch_size": 2}, "shard_size": 4, "seed": 3}
DOWN = ("unreachable", "could not connect to Redis")  # ours, and RQ's own in its dequeue loop


class OwnRedis:
    """A redis-server (AOF on, fsync every second) that can be SIGKILLed and started again on its files."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir, self.port = data_dir, free_port()
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc, self.url = start_redis(self.data_dir, self.port)

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            _stop([self.proc])


@pytest.fixture
def own_redis(tmp_path: Path):
    redis = OwnRedis(tmp_path / "redis-home")
    redis.start()
    yield redis
    redis.stop()


def _down_logged(output: str) -> bool:
    return any(words in output for words in DOWN)


def test_a_pairset_rides_out_a_redis_restart_with_the_same_pairs(own_redis: OwnRedis, services, tmp_path: Path) -> None:
    env = service_env(tmp_path / "data", own_redis.url, **OUTAGE, MIADPO_API_KEYS=KEY)
    port = free_port()
    api = services(["api", "--port", str(port)], env)
    cpu = services(["worker", "--queues", "cpu"], env)
    gpu = services(["worker", "--queues", "gpu"], env)
    conn = Redis.from_url(own_redis.url)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=A, timeout=60)
    try:
        wait_for(lambda: client.get("/readyz").status_code == 200, 60, "the API to be ready")
        write_sample_data(tmp_path / "sample", num_samples=12, seed=0)
        r = client.post("/v1/datasets", files={"file": ("shapes.zip", zip_folder(tmp_path / "sample"))})
        assert r.status_code == 201, r.text
        dataset_id = r.json()["id"]
        wait_for(lambda: client.get(f"/v1/datasets/{dataset_id}").json()["status"] == "ready", 60, "ingest")

        def run(body: dict[str, Any]) -> str:
            r = client.post("/v1/pairsets", json={"dataset_id": dataset_id, **body})
            assert r.status_code == 201, r.text
            return r.json()["id"]

        def finished(pairset_id: str) -> dict[str, Any]:
            def done() -> dict[str, Any] | None:
                ps = client.get(f"/v1/pairsets/{pairset_id}").json()
                return ps if ps["status"] in ("succeeded", "failed", "cancelled") else None

            return wait_for(done, 180, f"pair set {pairset_id} to finish", interval=0.2)  # type: ignore[return-value]

        undisturbed = finished(run(CONFIG))
        assert undisturbed["status"] == "succeeded", undisturbed

        disturbed_id = run(CONFIG)
        wait_for(lambda: sum(records.shard_progress(conn, disturbed_id).values()) > 0, 60, "the first batch", interval=0.02)
        own_redis.kill()
        killed_at = time.monotonic()
        # A gpu worker started while Redis is down waits for it instead of exiting.
        late = services(["worker", "--queues", "gpu"], env)

        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "redis_unavailable"
        r = client.get(f"/v1/pairsets/{disturbed_id}")
        assert r.status_code == 503 and r.json()["error"]["type"] == "transient_error", r.text
        assert r.headers["retry-after"] == "5"
        everyone = (cpu, gpu, late)
        wait_for(lambda: all(_down_logged(s.output()) for s in everyone), 60, "every worker to notice Redis is gone")
        time.sleep(max(0.0, 5 - (time.monotonic() - killed_at)))  # longer than redis-py's own quick retries
        assert all(s.proc.poll() is None for s in (api, *everyone)), "a service exited while Redis was down"
        print(f"Redis was down for {time.monotonic() - killed_at:.1f} s")
        own_redis.start()

        done = finished(disturbed_id)
        assert done["status"] == "succeeded", done
        assert done["counts"] == undisturbed["counts"]
        pairs = tmp_path / "data" / "pairsets"
        assert _rows(pairs / disturbed_id / "export" / "data") == _rows(pairs / undisturbed["id"] / "export" / "data")
        # The outage hit a running shard: it was re-run (or retried), and counted once.
        events = client.get(f"/v1/pairsets/{disturbed_id}/events", params={"limit": 1000}).json()["data"]
        assert "retry" in [e["type"] for e in events]
        assert done["progress"] == undisturbed["progress"]
        assert client.get("/readyz").status_code == 200  # the API recovered by itself
        assert all(s.proc.poll() is None for s in (api, *everyone)), "a service exited after Redis came back"
        assert "answers again" in late.output()
        for service in everyone:  # each rode it out in its own loop: RQ never ended one
            assert "unhandled exception" not in service.output() and "left its loop" not in service.output()
    finally:
        client.close()


def test_a_worker_and_the_trainer_started_while_redis_is_down_pick_work_up_once_it_is_back(
    own_redis: OwnRedis, services, tmp_path: Path
) -> None:
    conn = Redis.from_url(own_redis.url)
    settings = Settings(data_dir=tmp_path, redis_url=own_redis.url)
    # Enqueued before the outage: with AOF they are still there after it.
    jobs.enqueue(conn, settings, jobs.CPU, "os.getpid", job_id="for-the-worker", timeout=60)
    jobs.enqueue(conn, settings, jobs.TRAIN, "os.getpid", job_id="for-the-trainer", timeout=60)
    # AOF is fsynced every second (as in compose): kill only once both jobs are on disk, the outage this test
    # is about, not the last second's writes that everysec may lose.
    wait_for(lambda: all(any(j in f.read_bytes() for f in own_redis.data_dir.rglob("*.aof*") if f.is_file())
                         for j in (b"for-the-worker", b"for-the-trainer")), 10, "the jobs to reach the AOF")
    own_redis.kill()

    env = service_env(tmp_path, own_redis.url, **OUTAGE)
    started = [services(["worker", "--queues", "cpu"], env), services(["trainer"], env)]
    wait_for(lambda: all(s.output().count("unreachable") >= 2 for s in started), 90, "both to retry with backoff")
    assert all(s.proc.poll() is None for s in started)
    assert "start-up: Redis at 127.0.0.1:" in started[0].output()  # where, never the URL
    own_redis.start()

    for job_id in ("for-the-worker", "for-the-trainer"):
        wait_for(lambda job_id=job_id: Job.fetch(job_id, connection=conn).get_status() == "finished", 60, f"{job_id}")
    assert all(s.proc.poll() is None and "answers again" in s.output() for s in started)
    with contextlib.suppress(Exception):
        conn.close()
