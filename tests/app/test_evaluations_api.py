"""Evaluations over HTTP (in-process app, real Redis): the create contract, ownership, cancel, samples."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq.job import Job

from core import evaluations, jobs, records
from core.store import ArtifactStore
from tests.app.conftest import AUTH_A, AUTH_B
from tests.app.test_pairsets_api import make_dataset


def create(client: TestClient, body: dict, headers=AUTH_A):
    return client.post("/v1/evaluations", headers=headers, json=body)


def make_training(redis: Redis, status: str = "succeeded", owner: str = "") -> str:
    from tests.app.conftest import KEY_A

    record = records.new_training(owner or records.owner_of(KEY_A), pairset_id="ps_x", model="tiny-qwen2.5-vl", hyperparameters={}, checkpoint_every=1)
    record["status"] = status
    records.create(redis, records.TRAINING, record)
    return record["id"]


def test_create_fills_defaults_and_enqueues(client: TestClient, redis_client: Redis) -> None:
    dataset_id = make_dataset(client, redis_client)
    r = create(client, {"dataset_id": dataset_id})
    assert r.status_code == 201, r.text
    ev = r.json()
    assert ev["id"].startswith("ev_") and ev["object"] == "evaluation"
    assert (ev["status"], ev["model"], ev["training_id"], ev["result"], ev["progress"]) == ("queued", "tiny-llava", None, None, {"done": 0, "total": 0})
    assert ev["config"] == {"dataset_id": dataset_id, "formats": ["sequence", "grid", "pic_in_pic"], "num": 100, "seed": 0,
                            "max_new_tokens": 32, "batch_size": 8, "shard_size": 200, "model": "tiny-llava", "training_id": None}  # fmt: skip
    job = Job.fetch(jobs.start_job_id(records.EVALUATION, ev["id"]), connection=redis_client)
    assert job.func_name == "workers.tasks.run_evaluation" and job.args == (ev["id"],) and job.origin == "cpu"
    assert client.get(f"/v1/evaluations/{ev['id']}", headers=AUTH_A).json() == ev
    assert [e["id"] for e in client.get("/v1/evaluations", headers=AUTH_A).json()["data"]] == [ev["id"]]
    assert client.get(f"/v1/evaluations/{ev['id']}", headers=AUTH_B).status_code == 404
    assert client.get("/v1/evaluations", headers=AUTH_B).json()["data"] == []


def test_a_training_adapter_takes_the_trainings_model_unless_told(client: TestClient, redis_client: Redis) -> None:
    dataset_id = make_dataset(client, redis_client)
    training_id = make_training(redis_client)
    ev = create(client, {"dataset_id": dataset_id, "training_id": training_id}).json()
    assert (ev["model"], ev["training_id"]) == ("tiny-qwen2.5-vl", training_id)
    ev = create(client, {"dataset_id": dataset_id, "training_id": training_id, "model": "tiny-llava"}).json()
    assert ev["model"] == "tiny-llava"
    running = make_training(redis_client, status="running")
    r = create(client, {"dataset_id": dataset_id, "training_id": running})
    assert r.status_code == 409 and r.json()["error"]["code"] == "training_not_succeeded"
    r = create(client, {"dataset_id": dataset_id, "training_id": training_id}, headers=AUTH_B)
    assert r.status_code == 404 and r.json()["error"]["param"] == "dataset_id"


@pytest.mark.parametrize(
    ("patch", "param", "code"),
    [
        ({"num": 0}, "num", "greater_than_equal"),
        ({"formats": []}, "formats", "too_short"),
        ({"formats": ["grid", "grid"]}, "", "value_error"),
        ({"formats": ["collage"]}, "formats.0", "literal_error"),
        ({"max_new_tokens": 0}, "max_new_tokens", "greater_than_equal"),
        ({"colour": 1}, "colour", "extra_forbidden"),
    ],
)
def test_create_validation_422_names_the_param(client: TestClient, redis_client: Redis, patch, param, code) -> None:
    dataset_id = make_dataset(client, redis_client)
    r = create(client, {"dataset_id": dataset_id, **patch})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["param"] or "", error["code"]) == (param, code)


def test_dataset_must_be_ready_and_yours(client: TestClient, redis_client: Redis) -> None:
    pending = make_dataset(client, redis_client, ready=False)
    r = create(client, {"dataset_id": pending})
    assert r.status_code == 409 and r.json()["error"]["code"] == "dataset_not_ready"
    theirs = make_dataset(client, redis_client, headers=AUTH_B)
    assert create(client, {"dataset_id": theirs}).status_code == 404


def test_cancel_and_samples(client: TestClient, redis_client: Redis, settings) -> None:
    dataset_id = make_dataset(client, redis_client)
    ev = create(client, {"dataset_id": dataset_id}).json()
    r = client.get(f"/v1/evaluations/{ev['id']}/samples", headers=AUTH_A)
    assert r.status_code == 409 and r.json()["error"]["code"] == "evaluation_not_succeeded"
    r = client.post(f"/v1/evaluations/{ev['id']}/cancel", headers=AUTH_A)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert client.post(f"/v1/evaluations/{ev['id']}/cancel", headers=AUTH_A).status_code == 409
    # A succeeded one pages its records by uid.
    ev = create(client, {"dataset_id": dataset_id}).json()
    store = ArtifactStore(settings.data_dir)
    path = evaluations.samples_path(store, ev["id"])
    path.parent.mkdir(parents=True)
    rows = [{"uid": f"0-{i:07d}", "sample_id": "s", "format": "grid", "n_images": 2, "target_index": 0, "prompt": "<image>\nq",
             "answer": "a", "truth": "a", "truths": ["a", "b"], "correct": True, "confused_with": None,
             "ratios": {"answer_tokens": 0.5, "producing": None}, "single": {"prompt": "<image>\nq", "answer": "a", "correct": True},
             "recipe": {}} for i in range(3)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records.start_evaluation(redis_client, ev["id"], total=3, num_shards=1)
    records.finish_evaluation(redis_client, ev["id"], {"multi_image": {}})
    page = client.get(f"/v1/evaluations/{ev['id']}/samples?limit=2", headers=AUTH_A).json()
    assert [r["uid"] for r in page["data"]] == ["0-0000000", "0-0000001"] and page["has_more"]
    page = client.get(f"/v1/evaluations/{ev['id']}/samples?after=0-0000001", headers=AUTH_A).json()
    assert [r["uid"] for r in page["data"]] == ["0-0000002"] and not page["has_more"]
    assert "recipe" not in page["data"][0]
