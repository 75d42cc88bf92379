"""The gpu worker (DESIGN 3.2): it keeps its model between shard jobs, and a job past its time limit is stopped.

In this process: the app (TestClient) takes the upload and the pair set, and the worker a gpu worker is
(`cli.services.make_worker` on `cpu,gpu`: RQ's non-forking worker) runs the jobs in burst mode, on the
session's redis-server. `load_model` is watched (it still loads), to count how often the worker loads.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from rq.job import Job

from app.main import create_app
from cli.services import MiadpoSimpleWorker, make_worker
from core import jobs
from core.client import zip_folder
from core.settings import get_settings
from workers import tasks
from workers.sample_data import write_sample_data

KEY = "gpu-worker-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def make_settings(tmp_path, redis_url, redis_client, monkeypatch):
    """make_settings(**env) -> the process settings the jobs read (`get_settings()`): a fresh store, the test Redis."""

    def make(**extra: str):
        env = {"MIADPO_DATA_DIR": str(tmp_path / "data"), "MIADPO_REDIS_URL": redis_url, "MIADPO_API_KEYS": KEY,
               "MIADPO_DEVICE": "cpu", "MIADPO_JOB_RETRY_MAX": "0", **extra}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        tasks._redis.cache_clear()
        return get_settings()

    monkeypatch.setattr(tasks, "_loaded", None)  # no model left from another test in this process
    yield make
    get_settings.cache_clear()
    tasks._redis.cache_clear()


def _ready_dataset(api: TestClient, worker, folder) -> str:
    write_sample_data(folder, num_samples=12, seed=0)
    r = api.post("/v1/datasets", headers=AUTH, files={"file": ("sd.zip", zip_folder(folder))})
    assert r.status_code == 201, r.text
    worker.work(burst=True)
    assert api.get(f"/v1/datasets/{r.json()['id']}", headers=AUTH).json()["status"] == "ready"
    return r.json()["id"]


def test_a_gpu_worker_loads_its_model_once_for_all_its_shards(make_settings, tmp_path, monkeypatch):
    settings = make_settings()
    loads: list[str] = []
    real_load = tasks.load_model

    def watched_load(name, *args, **kwargs):
        loads.append(name)
        return real_load(name, *args, **kwargs)

    monkeypatch.setattr(tasks, "load_model", watched_load)
    worker = make_worker(settings, ["cpu", "gpu"])
    assert isinstance(worker, MiadpoSimpleWorker)  # the non-forking kind: jobs run in this process
    with TestClient(create_app(settings)) as api:
        dataset_id = _ready_dataset(api, worker, tmp_path / "sd")
        for seed in (1, 2):  # two pair sets of 3 shards each: 6 shard jobs for one model
            body = {"dataset_id": dataset_id, "augmentation": {"num": 6}, "shard_size": 2, "seed": seed,
                    "generation": {"max_new_tokens": 4, "batch_size": 2}}
            r = api.post("/v1/pairsets", headers=AUTH, json=body)
            assert r.status_code == 201, r.text
            worker.work(burst=True)
            ps = api.get(f"/v1/pairsets/{r.json()['id']}", headers=AUTH).json()
            assert ps["status"] == "succeeded" and ps["progress"]["done"] == 6, ps
    assert loads == ["tiny-llava"]  # six shard jobs (and two merges), one load


def test_a_shard_job_past_its_time_limit_is_stopped_and_fails_the_pairset(make_settings, tmp_path, redis_client):
    """Pair-set jobs limited to 2 s (`MIADPO_PAIRSET_TIMEOUT_S`), one retry: a shard that needs far longer is
    stopped at the limit both times, part-way, and the pair set fails with `job_timeout`."""
    settings = make_settings(MIADPO_PAIRSET_TIMEOUT_S="2", MIADPO_JOB_RETRY_MAX="1", MIADPO_JOB_RETRY_INTERVALS="0")
    worker = make_worker(settings, ["cpu", "gpu"])
    with TestClient(create_app(settings)) as api:
        dataset_id = _ready_dataset(api, worker, tmp_path / "sd")
        body = {"dataset_id": dataset_id, "augmentation": {"num": 16}, "shard_size": 16, "seed": 2,
                "generation": {"max_new_tokens": 256, "batch_size": 2}}
        r = api.post("/v1/pairsets", headers=AUTH, json=body)
        assert r.status_code == 201, r.text
        pairset_id = r.json()["id"]
        worker.work(burst=True)  # returns: the shard was stopped, twice, and nothing else is left to run
        ps = api.get(f"/v1/pairsets/{pairset_id}", headers=AUTH).json()
        events = api.get(f"/v1/pairsets/{pairset_id}/events", headers=AUTH, params={"limit": 1000}).json()["data"]
    assert ps["status"] == "failed" and ps["error"]["code"] == "job_timeout", ps
    assert ps["progress"]["done"] < 16  # stopped part-way, not run to the end
    job = Job.fetch(jobs.pairset_shard_job_id(pairset_id, 0), connection=redis_client)
    assert job.timeout == 2 and job.get_status() == "failed"
    assert "JobTimeoutException" in (job.latest_result().exc_string or "")
    retries = [e["data"] for e in events if e["type"] == "retry"]
    assert [e["error"] for e in retries] == ["JobTimeoutException"], retries
    assert not (settings.data_dir / "pairsets" / pairset_id / "export").exists()
