"""A gpu worker keeps its model between shard jobs (DESIGN 3.2): loaded once, used for every shard.

In this process: the app (TestClient) takes the upload and the pair set, and the worker a gpu worker is
(`cli.services.make_worker` on `cpu,gpu`: RQ's non-forking worker) runs the jobs in burst mode, on the
session's redis-server. `load_model` is watched (it still loads), to count how often the worker loads.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from cli.services import make_worker
from core.client import zip_folder
from core.settings import get_settings
from workers import tasks
from workers.sample_data import write_sample_data

KEY = "gpu-worker-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def settings(tmp_path, redis_url, redis_client, monkeypatch):
    """The process settings the jobs read (`get_settings()`), pointed at a fresh store and the test Redis."""
    for name, value in {"MIADPO_DATA_DIR": str(tmp_path / "data"), "MIADPO_REDIS_URL": redis_url,
                        "MIADPO_API_KEYS": KEY, "MIADPO_DEVICE": "cpu", "MIADPO_JOB_RETRY_MAX": "0"}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    tasks._redis.cache_clear()
    monkeypatch.setattr(tasks, "_loaded", None)  # no model left from another test in this process
    yield get_settings()
    get_settings.cache_clear()
    tasks._redis.cache_clear()


def test_a_gpu_worker_loads_its_model_once_for_all_its_shards(settings, tmp_path, monkeypatch):
    loads: list[str] = []
    real_load = tasks.load_model

    def watched_load(name, *args, **kwargs):
        loads.append(name)
        return real_load(name, *args, **kwargs)

    monkeypatch.setattr(tasks, "load_model", watched_load)
    write_sample_data(tmp_path / "sd", num_samples=12, seed=0)
    worker = make_worker(settings, ["cpu", "gpu"])
    assert not worker.__class__.__name__.startswith("MiadpoWorker")  # the non-forking kind: jobs run here
    with TestClient(create_app(settings)) as api:
        r = api.post("/v1/datasets", headers=AUTH, files={"file": ("sd.zip", zip_folder(tmp_path / "sd"))})
        assert r.status_code == 201, r.text
        dataset_id = r.json()["id"]
        worker.work(burst=True)
        assert api.get(f"/v1/datasets/{dataset_id}", headers=AUTH).json()["status"] == "ready"
        for seed in (1, 2):  # two pair sets of 3 shards each: 6 shard jobs for one model
            body = {"dataset_id": dataset_id, "augmentation": {"num": 6}, "shard_size": 2, "seed": seed,
                    "generation": {"max_new_tokens": 4, "batch_size": 2}}
            r = api.post("/v1/pairsets", headers=AUTH, json=body)
            assert r.status_code == 201, r.text
            worker.work(burst=True)
            ps = api.get(f"/v1/pairsets/{r.json()['id']}", headers=AUTH).json()
            assert ps["status"] == "succeeded" and ps["progress"]["done"] == 6, ps
    assert loads == ["tiny-llava"]  # six shard jobs (and two merges), one load
