"""Pair sets over HTTP (in-process app, real Redis): the create contract, ownership, events, cancel."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq.job import Job

from core import jobs, records
from tests.app.conftest import AUTH_A, AUTH_B

MANIFEST = {"source_format": "llava", "num_rows": 10, "num_samples": 10, "num_images": 10, "problems": []}


def make_dataset(client: TestClient, redis: Redis, headers=AUTH_A, ready: bool = True) -> str:
    r = client.post("/v1/datasets", headers=headers, files={"file": ("d.zip", b"PK")})
    dataset_id = r.json()["id"]
    if ready:
        records.set_dataset_ready(redis, dataset_id, MANIFEST, max_problems=10)
    return dataset_id


def create(client: TestClient, body: dict, headers=AUTH_A):
    return client.post("/v1/pairsets", headers=headers, json=body)


@pytest.fixture
def dataset_id(client: TestClient, redis_client: Redis) -> str:
    return make_dataset(client, redis_client)


def test_create_fills_defaults_records_queued_and_calls_the_hook(client: TestClient, redis_client: Redis, dataset_id: str) -> None:
    r = create(client, {"dataset_id": dataset_id})
    assert r.status_code == 201, r.text
    ps = r.json()
    assert ps["id"].startswith("ps_") and ps["object"] == "pairset"
    assert (ps["status"], ps["stage"], ps["error"], ps["dataset_id"], ps["model"]) == ("queued", None, None, dataset_id, "tiny-llava")
    assert ps["progress"] == {"done": 0, "total": 0}
    assert ps["counts"] == {
        "prompts": 0, "candidates": 0, "hallucinated": 0, "pairs": 0,
        "distractors_from_source": 0, "box_samples_skipped": 0,
        "removed": {"perplexity": 0, "length_ratio": 0, "edit_distance": 0, "perplexity_gate": 0},
    }  # fmt: skip
    config = ps["config"]
    assert config["preset"] == "paper"
    assert config["augmentation"] == {"num": 100, "formats": ["sequence", "grid", "pic_in_pic"], "mix": None}
    assert config["generation"] == {
        "max_new_tokens": 512, "num_candidates": 1, "temperature": 0.0, "top_p": 1.0, "batch_size": 8,
        "backend": None, "endpoint": None, "noise": {},
    }  # fmt: skip
    assert config["selection"] == {
        "thresholds": None, "attention_rows": "producing", "perplexity_gate": None,
        "comparison": {"sequence": "<=", "grid": "<=", "pic_in_pic": "<="},
    }  # fmt: skip
    assert config["post_selection"] == {"k": 1.5, "perplexity": True, "length_ratio": True, "edit_distance": True}
    assert (config["seed"], config["shard_size"], config["train"]) == (0, 200, None)
    job = Job.fetch(jobs.pairset_job_id(ps["id"]), connection=redis_client)
    assert job.func_name == "workers.tasks.run_pairset" and job.args == (ps["id"],)
    assert job.meta["resource"] == ["pairset", ps["id"]]
    assert client.get(f"/v1/pairsets/{ps['id']}", headers=AUTH_A).json() == ps


def test_create_accepts_a_full_config(client: TestClient, dataset_id: str) -> None:
    body = {
        "dataset_id": dataset_id,
        "model": "tiny-llava-hf",
        "augmentation": {"num": 1000, "formats": ["grid", "sequence"], "mix": {"grid_counts": {"2": 1, "9": 1}}},
        "generation": {"num_candidates": 4, "temperature": 0.7, "top_p": 0.9, "backend": "openai", "endpoint": "vllm",
                       "noise": {"grid": {"std": 25}}},
        "preset": "official_code",
        "selection": {"thresholds": {"grid": {"9": 0.35}}},
        "post_selection": {"k": 3, "edit_distance": False},
        "seed": 7,
        "shard_size": 50,
        "train": {"hyperparameters": {"num_epochs": 1, "lora_r": 8}, "checkpoint_every": 10},
    }
    r = create(client, body)
    assert r.status_code == 201, r.text
    config = r.json()["config"]
    assert config["selection"]["thresholds"] == {"grid": {"9": 0.35}}
    # Explicit values win over the preset, the preset fills in the rest.
    assert config["generation"]["noise"] == {"grid": {"std": 25.0, "region": "target"}}
    assert (config["preset"], config["selection"]["perplexity_gate"], config["selection"]["comparison"]["grid"]) == ("official_code", 1.1, "<")
    assert (config["post_selection"]["k"], config["post_selection"]["edit_distance"], config["post_selection"]["perplexity"]) == (3.0, False, False)
    assert config["augmentation"]["mix"] == {"formats": None, "sequence_counts": None, "grid_counts": {"2": 1.0, "9": 1.0}}
    train = config["train"]  # the training schema, defaults filled in
    assert (train["model"], train["checkpoint_every"]) == (None, 10)
    assert (train["hyperparameters"]["num_epochs"], train["hyperparameters"]["lora_r"], train["hyperparameters"]["beta"]) == (1, 8, 0.1)


@pytest.mark.parametrize(
    ("patch", "param", "code"),
    [
        ({"colour": "red"}, "colour", "extra_forbidden"),
        ({"augmentation": {"num": 100, "shuffle": True}}, "augmentation.shuffle", "extra_forbidden"),
        ({"augmentation": {"num": 0}}, "augmentation.num", "greater_than_equal"),
        ({"augmentation": {"num": 1_000_001}}, "augmentation.num", "less_than_equal"),
        ({"augmentation": {"formats": ["collage"]}}, "augmentation.formats.0", "literal_error"),
        ({"augmentation": {"formats": []}}, "augmentation.formats", "too_short"),
        ({"augmentation": {"mix": {"sequence_counts": {"7": 1}}}}, "augmentation", "value_error"),
        ({"generation": {"num_candidates": 3}}, "generation", "value_error"),
        ({"generation": {"backend": "tgi"}}, "generation.backend", "literal_error"),
        ({"generation": {"endpoint": "vllm"}}, "generation", "value_error"),
        ({"generation": {"backend": "openai", "base_url": "http://127.0.0.1:8099/"}}, "generation.base_url", "extra_forbidden"),
        ({"generation": {"backend": "openai", "endpoint": "http://127.0.0.1:8099/"}}, "generation.endpoint", "string_pattern_mismatch"),
        ({"generation": {"backend": "openai", "endpoint": "nope"}}, "generation.endpoint", "unknown_endpoint"),
        ({"generation": {"backend": "openai"}}, "generation.endpoint", "no_endpoint"),
        ({"model": "/etc/passwd"}, "model", "string_pattern_mismatch"),
        ({"model": "../../etc"}, "model", "string_pattern_mismatch"),
        ({"model": "root"}, "model", "model_not_found"),
        ({"model": "org/not-cached"}, "model", "model_not_found"),
        ({"augmentation": {"num": 20_001}}, "augmentation.num", "too_many_prompts"),
        ({"train": {"hyperparameters": {"lora_target": "nothing"}}}, "train.hyperparameters.lora_target", "lora_target_matches_nothing"),
        ({"train": {"hyperparameters": {"max_length": 1}}}, "train.hyperparameters.max_length", "max_length_too_small"),
        ({"train": {"hyperparameters": {"max_steps": 10**6}}}, "train.hyperparameters.max_steps", "too_many_steps"),
        ({"train": {"hyperparameters": {"num_epochs": 10**3}}}, "train.hyperparameters.num_epochs", "too_many_steps"),
        ({"train": {"hyperparameters": {"num_epochs": 10**9}}}, "train.hyperparameters.num_epochs", "less_than_equal"),
        ({"train": {"hyperparameters": {"lora_r": 10**9}}}, "train.hyperparameters.lora_r", "less_than_equal"),
        ({"train": {"model": "/root"}}, "train.model", "string_pattern_mismatch"),
        ({"generation": {"noise": {"grid": {"std": -1}}}}, "generation.noise.grid.std", "greater_than_equal"),
        ({"generation": {"noise": {"grid": {"std": 300}}}}, "generation.noise.grid.std", "less_than_equal"),
        ({"generation": {"noise": {"collage": {"std": 3}}}}, "generation.noise.collage.[key]", "literal_error"),
        ({"generation": {"noise": {"grid": {"std": 3, "region": "cell"}}}}, "generation.noise.grid.region", "literal_error"),
        ({"preset": "mine"}, "preset", "literal_error"),
        ({"selection": {"attention_rows": "all"}}, "selection.attention_rows", "literal_error"),
        ({"selection": {"comparison": {"grid": ">"}}}, "selection.comparison.grid", "literal_error"),
        ({"selection": {"perplexity_gate": -1}}, "selection.perplexity_gate", "greater_than_equal"),
        ({"selection": {"thresholds": {"grid": {"5": 0.5}}}}, "selection", "value_error"),
        ({"selection": {"thresholds": {"grid": {"4": 1.5}}}}, "selection.thresholds.grid.4", "less_than_equal"),
        ({"post_selection": {"k": 0}}, "post_selection.k", "greater_than"),
        ({"seed": -1}, "seed", "greater_than_equal"),
        ({"shard_size": 0}, "shard_size", "greater_than_equal"),
        ({"dataset_id": None}, "dataset_id", "string_type"),
    ],
)
def test_create_validation_422_names_the_param(client: TestClient, dataset_id: str, patch: dict, param: str, code: str) -> None:
    r = create(client, {"dataset_id": dataset_id, **patch})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_create_needs_a_ready_dataset_of_yours(client: TestClient, redis_client: Redis) -> None:
    r = create(client, {"dataset_id": "ds_doesnotexist"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "dataset_id"
    theirs = make_dataset(client, redis_client, headers=AUTH_B)
    r = create(client, {"dataset_id": theirs})
    assert r.status_code == 404 and r.json()["error"]["code"] == "dataset_not_found"
    validating = make_dataset(client, redis_client, ready=False)
    r = create(client, {"dataset_id": validating})
    assert r.status_code == 409
    assert r.json()["error"] == {
        "type": "conflict_error",
        "code": "dataset_not_ready",
        "message": f"dataset {validating} is validating, not ready",
        "param": "dataset_id",
    }
    records.set_dataset_failed(redis_client, validating, code="unsafe_archive", message="no")
    assert create(client, {"dataset_id": validating}).status_code == 409
    assert client.get("/v1/pairsets", headers=AUTH_A).json()["data"] == []


def test_another_key_gets_404(client: TestClient, dataset_id: str) -> None:
    ps = create(client, {"dataset_id": dataset_id}).json()
    for method, path in (
        ("GET", f"/v1/pairsets/{ps['id']}"),
        ("GET", f"/v1/pairsets/{ps['id']}/events"),
        ("POST", f"/v1/pairsets/{ps['id']}/cancel"),
    ):
        r = client.request(method, path, headers=AUTH_B)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "pairset_not_found"
    assert client.get("/v1/pairsets", headers=AUTH_B).json() == {"object": "list", "data": [], "has_more": False}


def test_list_pagination(client: TestClient, dataset_id: str) -> None:
    ids = [create(client, {"dataset_id": dataset_id, "seed": i}).json()["id"] for i in range(3)]
    page = client.get("/v1/pairsets?limit=2", headers=AUTH_A).json()
    assert [p["id"] for p in page["data"]] == ids[::-1][:2] and page["has_more"] is True
    page = client.get(f"/v1/pairsets?limit=2&after={ids[1]}", headers=AUTH_A).json()
    assert [p["id"] for p in page["data"]] == ids[:1] and page["has_more"] is False


def test_idempotency(client: TestClient, redis_client: Redis, dataset_id: str) -> None:
    headers = {**AUTH_A, "Idempotency-Key": "ps-1"}
    first = create(client, {"dataset_id": dataset_id}, headers=headers)
    again = create(client, {"dataset_id": dataset_id}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert len(client.get("/v1/pairsets", headers=AUTH_A).json()["data"]) == 1
    r = create(client, {"dataset_id": dataset_id, "seed": 1}, headers=headers)
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused"
    # A failed first request does not burn the key.
    bad = {**AUTH_A, "Idempotency-Key": "ps-2"}
    assert create(client, {"dataset_id": "ds_nothere"}, headers=bad).status_code == 404
    assert create(client, {"dataset_id": dataset_id}, headers=bad).status_code == 201
    # A repeat while the first is still running is refused rather than run twice.
    owner = records.owner_of(AUTH_A["Authorization"].split()[1])
    from app.idempotency import fingerprint

    body = {"dataset_id": dataset_id, "seed": 5}
    full = create(client, body).json()["config"]  # the canonical request, defaults filled in
    records.idempotency_begin(redis_client, owner, "ps-3", fingerprint("pairset", full))
    r = create(client, body, headers={**AUTH_A, "Idempotency-Key": "ps-3"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_in_progress"


def test_cancel_a_queued_pairset(client: TestClient, redis_client: Redis, dataset_id: str) -> None:
    ps = create(client, {"dataset_id": dataset_id}).json()
    r = client.post(f"/v1/pairsets/{ps['id']}/cancel", headers=AUTH_A)
    assert r.status_code == 200
    got = r.json()
    assert got["status"] == "cancelled" and got["finished_at"] is not None
    assert records.cancel_requested(redis_client, ps["id"])
    assert Job.fetch(jobs.pairset_job_id(ps["id"]), connection=redis_client).get_status() == "canceled"
    r = client.post(f"/v1/pairsets/{ps['id']}/cancel", headers=AUTH_A)
    assert r.status_code == 409 and r.json()["error"]["code"] == "pairset_finished"


def test_cancel_a_running_pairset_raises_the_flag(client: TestClient, redis_client: Redis, dataset_id: str) -> None:
    ps = create(client, {"dataset_id": dataset_id}).json()
    records.start_pairset(redis_client, ps["id"], total=100, num_shards=1)
    jobs.enqueue_pairset_shards(redis_client, ps["id"], 1, settings=client.app.state.settings)  # type: ignore[attr-defined]
    got = client.post(f"/v1/pairsets/{ps['id']}/cancel", headers=AUTH_A).json()
    # Cancelled at once; running shard jobs see the flag between batches and stop without a retry.
    assert got["status"] == "cancelled" and records.cancel_requested(redis_client, ps["id"])
    for job_id in (jobs.pairset_shard_job_id(ps["id"], 0), jobs.pairset_merge_job_id(ps["id"])):
        assert Job.fetch(job_id, connection=redis_client).get_status() == "canceled"
    assert client.post(f"/v1/pairsets/{ps['id']}/cancel", headers=AUTH_A).status_code == 409
    # A finished pair set never changes status again.
    records.set_pairset_status(redis_client, ps["id"], "failed", error={"code": "x", "message": "y"})
    assert client.get(f"/v1/pairsets/{ps['id']}", headers=AUTH_A).json()["status"] == "cancelled"


def test_events_in_order_as_json(client: TestClient, redis_client: Redis, dataset_id: str) -> None:
    ps = create(client, {"dataset_id": dataset_id}).json()
    records.set_pairset_status(redis_client, ps["id"], "running", stage="augment")
    for i in range(3):
        records.append_event(redis_client, ps["id"], "warning", {"i": i})
    records.set_pairset_status(redis_client, ps["id"], "succeeded", stage="export")
    events = client.get(f"/v1/pairsets/{ps['id']}/events", headers=AUTH_A).json()
    assert events["object"] == "list" and events["has_more"] is False
    assert [e["type"] for e in events["data"]] == ["created", "status", "warning", "warning", "warning", "status"]
    assert events["data"][1]["data"] == {"status": "running", "stage": "augment", "error": None}
    assert events["data"][-1]["data"]["status"] == "succeeded"
    assert all(set(e) == {"id", "type", "data", "created_at"} for e in events["data"])
    page = client.get(f"/v1/pairsets/{ps['id']}/events?limit=2&after={events['data'][1]['id']}", headers=AUTH_A).json()
    assert [e["data"] for e in page["data"]] == [{"i": 0}, {"i": 1}] and page["has_more"] is True


def test_events_stream_as_sse_until_finished(client: TestClient, redis_client: Redis, dataset_id: str) -> None:
    ps = create(client, {"dataset_id": dataset_id}).json()
    client.post(f"/v1/pairsets/{ps['id']}/cancel", headers=AUTH_A)
    headers = {**AUTH_A, "Accept": "text/event-stream"}
    with client.stream("GET", f"/v1/pairsets/{ps['id']}/events", headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())  # ends by itself: the pair set is finished
    blocks = [b for b in text.split("\n\n") if b.strip()]
    parsed = [dict(line.split(": ", 1) for line in b.splitlines()) for b in blocks]
    assert [p["event"] for p in parsed] == ["created", "cancel_requested", "status"]
    last = json.loads(parsed[-1]["data"])
    assert last["data"]["status"] == "cancelled" and last["id"] == parsed[-1]["id"]
    # Resuming after an event id gives only what came after it.
    with client.stream("GET", f"/v1/pairsets/{ps['id']}/events", headers={**headers, "Last-Event-ID": parsed[0]["id"]}) as r:
        resumed = "".join(r.iter_text())
    assert "event: created" not in resumed and resumed.count("event: ") == 2
