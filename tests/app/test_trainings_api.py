"""Trainings over HTTP (in-process app, real Redis): the create contract and its validation, ownership,
cancel, lists, events, checkpoints and adapter archives (Range), and the chain from a pair set's `train`.

Pair sets, checkpoints and adapters are crafted directly (core.records, the store): the training itself
runs in tests/trainer and tests/e2e.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq.job import Job

from app.schemas import PairSetCreate
from core import jobs, records, trainings
from core.errors import UserError
from core.settings import Settings
from core.store import ArtifactStore
from tests.app.conftest import AUTH_A, AUTH_B, KEY_A, KEY_B
from trainer.checkpoints import mark_complete
from trainer.config import TrainHyperparameters

COUNTS = {
    "prompts": 10, "candidates": 10, "hallucinated": 6, "pairs": 5,
    "removed": {"perplexity": 1, "length_ratio": 0, "edit_distance": 0},
}  # fmt: skip
OWNER_A, OWNER_B = records.owner_of(KEY_A), records.owner_of(KEY_B)


def make_pairset(redis: Redis, owner: str = OWNER_A, *, status: str = "succeeded", pairs: int = 5, **config) -> str:
    """A pair-set record as the pipeline leaves it (`status`), with `pairs` pairs."""
    body = PairSetCreate(dataset_id="ds_x", model="tiny-llava", **config).model_dump(mode="json")
    rec = records.create(redis, records.PAIRSET, records.new_pairset(owner, dataset_id="ds_x", model="tiny-llava", config=body))
    if status != "queued":
        records.start_pairset(redis, rec["id"], total=10, num_shards=1)
    if status == "succeeded":
        records.finish_pairset(redis, rec["id"], {**COUNTS, "pairs": pairs})
    elif status in ("failed", "cancelled"):
        records.set_pairset_status(redis, rec["id"], status)
    return rec["id"]


def create(client: TestClient, body: dict, headers=AUTH_A):
    return client.post("/v1/trainings", headers=headers, json=body)


@pytest.fixture
def pairset_id(redis_client: Redis) -> str:
    return make_pairset(redis_client)


@pytest.fixture
def store(settings: Settings) -> ArtifactStore:
    return ArtifactStore(settings.data_dir)


def test_create_fills_defaults_records_queued_and_enqueues_the_job(client: TestClient, redis_client: Redis, pairset_id: str) -> None:
    r = create(client, {"pairset_id": pairset_id, "hyperparameters": {"lora_r": 8, "max_steps": 4}, "checkpoint_every": 2})
    assert r.status_code == 201, r.text
    tr = r.json()
    assert tr["id"].startswith("tr_") and tr["object"] == "training"
    assert (tr["pairset_id"], tr["model"], tr["status"], tr["checkpoint_every"]) == (pairset_id, "tiny-llava", "queued", 2)
    assert tr["hyperparameters"] == TrainHyperparameters(lora_r=8, max_steps=4).to_dict()  # every default filled in
    assert tr["preset"] == "paper"
    assert tr["progress"] == {"step": 0, "total_steps": 4}
    assert (tr["metrics"], tr["checkpoints"], tr["adapter"], tr["error"]) == ({}, {"count": 0, "last_step": None}, None, None)
    assert tr["started_at"] is None and tr["finished_at"] is None and tr["created_at"] > 0
    assert "owner" not in tr
    job = Job.fetch(jobs.training_job_id(tr["id"]), connection=redis_client)
    assert job.id == f"training-{tr['id']}" and job.origin == "train"
    assert job.func_name == "trainer.tasks.run_training_job" and job.args == (tr["id"],)
    assert job.meta["resource"] == ["training", tr["id"]] and job.retries_left == 3
    assert job.timeout == client.app.state.settings.training_timeout_s  # type: ignore[attr-defined]
    assert client.get(f"/v1/trainings/{tr['id']}", headers=AUTH_A).json() == tr
    events = client.get(f"/v1/trainings/{tr['id']}/events", headers=AUTH_A).json()["data"]
    assert [(e["type"], e["data"]) for e in events] == [("created", {"status": "queued", "pairset_id": pairset_id})]


def test_defaults_and_an_explicit_model(client: TestClient, pairset_id: str) -> None:
    tr = create(client, {"pairset_id": pairset_id}).json()
    assert tr["hyperparameters"] == TrainHyperparameters().to_dict() and tr["checkpoint_every"] == 100
    assert tr["progress"] == {"step": 0, "total_steps": 0}  # known once the trainer has counted the pairs
    tr = create(client, {"pairset_id": pairset_id, "model": "tiny-qwen2.5-vl"}).json()
    assert tr["model"] == "tiny-qwen2.5-vl"


def test_presets_fill_what_the_request_leaves_out(client: TestClient, pairset_id: str) -> None:
    paper = create(client, {"pairset_id": pairset_id}).json()
    assert paper["preset"] == "paper" and (paper["hyperparameters"]["num_epochs"], paper["hyperparameters"]["nll_weight"]) == (3, 0.1)
    official = create(client, {"pairset_id": pairset_id, "preset": "official_code"}).json()
    hp = official["hyperparameters"]
    assert official["preset"] == "official_code"
    assert (hp["num_epochs"], hp["nll_weight"], hp["effective_batch_size"], hp["lora_dropout"]) == (1, 0.0, 64, 0.0)
    assert (hp["warmup_ratio"], hp["lr_scheduler"], hp["gradient_accumulation_steps"]) == (0.1, "linear", 1)
    # Explicit hyperparameters win; an explicit accumulation keeps the preset's effective batch out.
    mine = create(client, {"pairset_id": pairset_id, "preset": "official_code",
                           "hyperparameters": {"num_epochs": 2, "gradient_accumulation_steps": 4}}).json()["hyperparameters"]
    assert (mine["num_epochs"], mine["gradient_accumulation_steps"], mine["effective_batch_size"], mine["nll_weight"]) == (2, 4, None, 0.0)


@pytest.mark.parametrize(
    ("patch", "param", "code", "says"),
    [
        ({"colour": "red"}, "colour", "extra_forbidden", ""),
        ({"hyperparameters": {"epochs": 1}}, "hyperparameters.epochs", "extra_forbidden", ""),
        ({"hyperparameters": {"lora_r": 0}}, "hyperparameters.lora_r", "greater_than_equal", ""),
        ({"hyperparameters": {"lora_r": True}}, "hyperparameters.lora_r", "int_type", ""),
        ({"hyperparameters": {"beta": "0.1"}}, "hyperparameters.beta", "float_type", ""),
        ({"hyperparameters": {"learning_rate": 2}}, "hyperparameters.learning_rate", "less_than_equal", ""),
        ({"hyperparameters": {"warmup_ratio": 1}}, "hyperparameters.warmup_ratio", "less_than", ""),
        ({"hyperparameters": {"max_steps": 0}}, "hyperparameters.max_steps", "greater_than_equal", ""),
        # What only TrainHyperparameters knows: its ValueError, naming the parameter.
        ({"hyperparameters": {"lr_scheduler": "exponential"}}, "hyperparameters.lr_scheduler", "value_error", "lr_scheduler must be one of"),
        ({"hyperparameters": {"lora_target": "(q_proj"}}, "hyperparameters.lora_target", "value_error", "lora_target is not a valid regex"),
        ({"checkpoint_every": 0}, "checkpoint_every", "greater_than_equal", ""),
        ({"preset": "mine"}, "preset", "literal_error", ""),
        ({"hyperparameters": {"effective_batch_size": 64, "gradient_accumulation_steps": 2}}, "hyperparameters", "value_error", "not both"),
        ({"model": ""}, "model", "string_pattern_mismatch", ""),
        ({"model": "/etc/passwd"}, "model", "string_pattern_mismatch", ""),
        ({"model": "etc"}, "model", "model_not_found", "not available here"),
        # What the model's modules and images allow (its config on the meta device), and the steps quota.
        ({"hyperparameters": {"lora_target": "matches.nothing"}}, "hyperparameters.lora_target", "lora_target_matches_nothing", "language_model"),
        ({"hyperparameters": {"max_length": 1}}, "hyperparameters.max_length", "max_length_too_small", "at least"),
        ({"hyperparameters": {"max_steps": 10**12}}, "hyperparameters.max_steps", "less_than_equal", ""),
        ({"hyperparameters": {"max_steps": 10**6}}, "hyperparameters.max_steps", "too_many_steps", "at most 5000"),
        ({"hyperparameters": {"num_epochs": 10**9}}, "hyperparameters.num_epochs", "less_than_equal", ""),
        ({"hyperparameters": {"lora_r": 10**9}}, "hyperparameters.lora_r", "less_than_equal", ""),
        ({"pairset_id": None}, "pairset_id", "string_type", ""),
    ],
)
def test_create_validation_422_names_the_param(
    client: TestClient, pairset_id: str, patch: dict, param: str, code: str, says: str
) -> None:
    r = create(client, {"pairset_id": pairset_id, **patch})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert says in error["message"]
    assert client.get("/v1/trainings", headers=AUTH_A).json()["data"] == []


def test_a_pairsets_train_is_validated_by_the_same_schema(client: TestClient, redis_client: Redis) -> None:
    dataset = client.post("/v1/datasets", headers=AUTH_A, files={"file": ("d.zip", b"PK")}).json()["id"]
    manifest = {"source_format": "llava", "num_rows": 1, "num_samples": 1, "num_images": 1, "problems": []}
    records.set_dataset_ready(redis_client, dataset, manifest, max_problems=1)
    for train, param in (
        ({"hyperparameters": {"lora_target": "("}}, "train.hyperparameters.lora_target"),
        ({"hyperparameters": {"num_epochs": 0}}, "train.hyperparameters.num_epochs"),
        ({"epochs": 1}, "train.epochs"),
        ({"checkpoint_every": -1}, "train.checkpoint_every"),
    ):
        r = client.post("/v1/pairsets", headers=AUTH_A, json={"dataset_id": dataset, "train": train})
        assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text
    r = client.post("/v1/pairsets", headers=AUTH_A, json={"dataset_id": dataset, "train": {"hyperparameters": {"max_steps": 3}}})
    assert r.status_code == 201, r.text
    train = r.json()["config"]["train"]
    assert train == {"model": None, "preset": "paper", "hyperparameters": TrainHyperparameters(max_steps=3).to_dict(), "checkpoint_every": 100, "evaluation": None}
    assert r.json()["training_id"] is None


def test_create_needs_a_succeeded_pairset_of_yours_with_pairs(client: TestClient, redis_client: Redis) -> None:
    r = create(client, {"pairset_id": "ps_doesnotexist"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "pairset_id"
    theirs = make_pairset(redis_client, OWNER_B)
    r = create(client, {"pairset_id": theirs})
    assert r.status_code == 404 and r.json()["error"]["code"] == "pairset_not_found"
    for state in ("queued", "running", "failed", "cancelled"):
        pending = make_pairset(redis_client, status=state)
        r = create(client, {"pairset_id": pending})
        assert r.status_code == 409, state
        assert r.json()["error"] == {
            "type": "conflict_error",
            "code": "pairset_not_succeeded",
            "message": f"pair set {pending} is {state}: a training needs a succeeded pair set",
            "param": "pairset_id",
        }
    empty = make_pairset(redis_client, pairs=0)
    r = create(client, {"pairset_id": empty})
    assert r.status_code == 409 and r.json()["error"]["code"] == "empty_pair_set"
    assert client.get("/v1/trainings", headers=AUTH_A).json()["data"] == []
    assert create(client, {"pairset_id": theirs}, headers=AUTH_B).status_code == 201


def test_another_key_gets_404(client: TestClient, pairset_id: str) -> None:
    tr = create(client, {"pairset_id": pairset_id}).json()
    for method, path in (
        ("GET", f"/v1/trainings/{tr['id']}"),
        ("GET", f"/v1/trainings/{tr['id']}/events"),
        ("GET", f"/v1/trainings/{tr['id']}/checkpoints"),
        ("GET", f"/v1/trainings/{tr['id']}/checkpoints/1/download"),
        ("GET", f"/v1/trainings/{tr['id']}/adapter"),
        ("POST", f"/v1/trainings/{tr['id']}/cancel"),
    ):
        r = client.request(method, path, headers=AUTH_B)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "training_not_found"
    assert client.get("/v1/trainings", headers=AUTH_B).json() == {"object": "list", "data": [], "has_more": False}
    assert client.get("/v1/trainings/tr_nothere", headers=AUTH_A).status_code == 404


def test_list_pagination(client: TestClient, pairset_id: str) -> None:
    ids = [create(client, {"pairset_id": pairset_id, "hyperparameters": {"seed": i}}).json()["id"] for i in range(5)]
    seen, after = [], None
    while True:
        page = client.get("/v1/trainings", headers=AUTH_A, params={"limit": 2, **({"after": after} if after else {})}).json()
        seen.append([t["id"] for t in page["data"]])
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == [ids[::-1][0:2], ids[::-1][2:4], ids[::-1][4:]]
    assert client.get("/v1/trainings?limit=0", headers=AUTH_A).status_code == 422


def test_idempotency(client: TestClient, pairset_id: str) -> None:
    headers = {**AUTH_A, "Idempotency-Key": "tr-1"}
    body = {"pairset_id": pairset_id, "hyperparameters": {"max_steps": 2}}
    first, again = create(client, body, headers=headers), create(client, body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert len(client.get("/v1/trainings", headers=AUTH_A).json()["data"]) == 1
    r = create(client, {**body, "checkpoint_every": 1}, headers=headers)
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused"


def test_cancel_a_queued_training_drops_its_job(client: TestClient, redis_client: Redis, pairset_id: str) -> None:
    tr = create(client, {"pairset_id": pairset_id}).json()
    r = client.post(f"/v1/trainings/{tr['id']}/cancel", headers=AUTH_A)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["status"] == "cancelled" and got["finished_at"] is not None
    assert records.cancel_requested(redis_client, tr["id"])
    assert Job.fetch(jobs.training_job_id(tr["id"]), connection=redis_client).get_status() == "canceled"
    r = client.post(f"/v1/trainings/{tr['id']}/cancel", headers=AUTH_A)
    assert r.status_code == 409 and r.json()["error"]["code"] == "training_finished"
    types = [e["type"] for e in client.get(f"/v1/trainings/{tr['id']}/events", headers=AUTH_A).json()["data"]]
    assert types == ["created", "cancel_requested", "status"]


def test_cancel_a_running_training_raises_the_flag_and_freezes_the_record(
    client: TestClient, redis_client: Redis, pairset_id: str
) -> None:
    tr = create(client, {"pairset_id": pairset_id, "hyperparameters": {"max_steps": 10}}).json()
    records.start_training(redis_client, tr["id"], step=0)
    records.report_training_step(redis_client, tr["id"], step=3, total_steps=10, metrics={"loss": 0.7})
    got = client.post(f"/v1/trainings/{tr['id']}/cancel", headers=AUTH_A).json()
    # Cancelled at once; the running job sees the flag after its current step, saves it, and stops.
    assert (got["status"], got["progress"], got["metrics"]) == ("cancelled", {"step": 3, "total_steps": 10}, {"loss": 0.7})
    assert records.cancel_requested(redis_client, tr["id"])
    # Steps reported after the cancel are not recorded; the checkpoint saved because of it is.
    records.report_training_step(redis_client, tr["id"], step=4, total_steps=10, metrics={"loss": 0.6}, event={})
    records.report_training_checkpoint(redis_client, tr["id"], step=4, count=1, metrics={"loss": 0.6})
    after = client.get(f"/v1/trainings/{tr['id']}", headers=AUTH_A).json()
    assert (after["status"], after["progress"]["step"], after["checkpoints"]) == ("cancelled", 3, {"count": 1, "last_step": 4})
    records.set_training_status(redis_client, tr["id"], "failed", error={"code": "x", "message": "y"})
    assert client.get(f"/v1/trainings/{tr['id']}", headers=AUTH_A).json()["status"] == "cancelled"


def test_progress_metrics_and_events_of_a_run(client: TestClient, redis_client: Redis, pairset_id: str) -> None:
    tr = create(client, {"pairset_id": pairset_id}).json()
    tid = tr["id"]
    started = records.start_training(redis_client, tid, step=0)
    assert started["status"] == "running" and started["started_at"] is not None
    metrics = {"loss": 0.69, "rewards/chosen": 0.01, "rewards/rejected": -0.02, "rewards/margins": 0.03,
               "rewards/accuracies": 1.0, "grad_norm": float("nan")}  # fmt: skip
    records.report_training_step(redis_client, tid, step=1, total_steps=4, metrics=metrics, event={"epoch": 0.25, "lr": 1e-4})
    records.report_training_step(redis_client, tid, step=2, total_steps=4, metrics=metrics)  # no event: rate-limited
    records.report_training_checkpoint(redis_client, tid, step=2, count=1, metrics=metrics)
    got = client.get(f"/v1/trainings/{tid}", headers=AUTH_A).json()
    assert got["progress"] == {"step": 2, "total_steps": 4}
    assert got["metrics"] == {k: v for k, v in metrics.items() if k != "grad_norm"}  # JSON has no NaN
    assert got["checkpoints"] == {"count": 1, "last_step": 2}
    # The job re-run after its worker died resumes from the checkpoint at step 2.
    resumed = records.start_training(redis_client, tid, step=2)
    assert resumed["status"] == "running" and resumed["started_at"] == started["started_at"]
    adapter = {"size_bytes": 10, "url": f"/v1/trainings/{tid}/adapter"}
    done = records.finish_training(redis_client, tid, step=4, total_steps=4, metrics={"loss": 0.5}, adapter=adapter)
    assert (done["status"], done["progress"], done["adapter"], done["metrics"]) == ("succeeded", {"step": 4, "total_steps": 4}, adapter, {"loss": 0.5})
    events = client.get(f"/v1/trainings/{tid}/events", headers=AUTH_A).json()["data"]
    assert [(e["type"], e["data"].get("status") or e["data"].get("step")) for e in events] == [
        ("created", "queued"), ("status", "running"), ("step", 1), ("checkpoint", 2), ("resumed", 2), ("status", "succeeded"),
    ]  # fmt: skip
    assert events[2]["data"]["epoch"] == 0.25 and events[2]["data"]["metrics"]["rewards/accuracies"] == 1.0
    page = client.get(f"/v1/trainings/{tid}/events", headers=AUTH_A, params={"after": events[2]["id"], "limit": 2}).json()
    assert [e["id"] for e in page["data"]] == [e["id"] for e in events[3:5]] and page["has_more"] is True
    # The stream of a finished training: every event, then the end.
    with client.stream("GET", f"/v1/trainings/{tid}/events", headers={**AUTH_A, "Accept": "text/event-stream"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    assert [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("event: ")] == [e["type"] for e in events]


def _tiny_adapter(folder: Path, with_run_state: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "tokenizer.json").write_text("{}")
    if with_run_state:
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"):
            (folder / name).write_bytes(b"state")
    return folder


def _members(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return sorted(m.name for m in tar.getmembers() if m.isfile())


def test_checkpoints_list_and_download(client: TestClient, store: ArtifactStore, pairset_id: str) -> None:
    tid = create(client, {"pairset_id": pairset_id, "checkpoint_every": 2}).json()["id"]
    assert client.get(f"/v1/trainings/{tid}/checkpoints", headers=AUTH_A).json() == {"object": "list", "data": [], "has_more": False}
    out = trainings.output_dir(store, tid)
    for step in (2, 4):
        mark_complete(_tiny_adapter(out / f"checkpoint-{step}", with_run_state=True), step, {"loss": 1.0 / step, "rewards/accuracies": 0.5})
    _tiny_adapter(out / "checkpoint-6", with_run_state=True)  # being written: no marker yet
    listed = client.get(f"/v1/trainings/{tid}/checkpoints", headers=AUTH_A).json()["data"]
    assert [(c["step"], c["metrics"], c["url"]) for c in listed] == [
        (2, {"loss": 0.5, "rewards/accuracies": 0.5}, f"/v1/trainings/{tid}/checkpoints/2/download"),
        (4, {"loss": 0.25, "rewards/accuracies": 0.5}, f"/v1/trainings/{tid}/checkpoints/4/download"),
    ]
    assert all(c["created_at"] > 0 for c in listed)
    r = client.get(listed[1]["url"], headers=AUTH_A)
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    assert f'filename="{tid}-checkpoint-4.tar.gz"' in r.headers["content-disposition"]
    root = f"{tid}-checkpoint-4"
    assert _members(r.content) == [f"{root}/adapter_config.json", f"{root}/adapter_model.safetensors", f"{root}/tokenizer.json"]
    assert trainings.checkpoint_archive_path(store, tid, 4).is_file()  # built once, kept
    r2 = client.get(listed[1]["url"], headers={**AUTH_A, "Range": "bytes=10-99"})
    assert r2.status_code == 206 and r2.content == r.content[10:100]
    for step in (3, 6):
        r = client.get(f"/v1/trainings/{tid}/checkpoints/{step}/download", headers=AUTH_A)
        assert r.status_code == 404 and r.json()["error"]["code"] == "checkpoint_not_found"
    assert client.get(f"/v1/trainings/{tid}/checkpoints/0/download", headers=AUTH_A).status_code == 422


def test_adapter_409_until_succeeded_then_archive_with_range(
    client: TestClient, redis_client: Redis, store: ArtifactStore, pairset_id: str
) -> None:
    tid = create(client, {"pairset_id": pairset_id}).json()["id"]
    r = client.get(f"/v1/trainings/{tid}/adapter", headers=AUTH_A)
    assert r.status_code == 409 and r.json()["error"]["code"] == "training_not_succeeded"
    records.start_training(redis_client, tid, step=0)
    assert client.get(f"/v1/trainings/{tid}/adapter", headers=AUTH_A).status_code == 409
    _tiny_adapter(trainings.adapter_dir(store, tid))
    archive = trainings.build_adapter_archive(store, tid, rebuild=True)  # what the job does when it succeeds
    adapter = {"size_bytes": archive.stat().st_size, "url": f"/v1/trainings/{tid}/adapter"}
    records.finish_training(redis_client, tid, step=3, total_steps=3, metrics={}, adapter=adapter)
    r = client.get(adapter["url"], headers=AUTH_A)
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    data = r.content
    assert len(data) == int(r.headers["content-length"]) == adapter["size_bytes"]
    root = f"{tid}-adapter"
    assert _members(data) == [f"{root}/adapter_config.json", f"{root}/adapter_model.safetensors", f"{root}/tokenizer.json"]
    r = client.get(adapter["url"], headers={**AUTH_A, "Range": "bytes=100-"})
    assert r.status_code == 206 and r.content == data[100:]
    assert r.headers["content-range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
    r = client.get(adapter["url"], headers={**AUTH_A, "Range": f"bytes={len(data) + 10}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("range_not_satisfiable", "Range")
    for malformed in ("bytes=9-3", "items=0-1", "bytes", "bytes=-"):  # ignored (RFC 9110 14.2): the whole archive
        r = client.get(adapter["url"], headers={**AUTH_A, "Range": malformed})
        assert r.status_code == 200 and r.content == data, malformed
    # Gone from the store (a cleanup): built again from the adapter folder, the same bytes.
    archive.unlink()
    assert client.get(adapter["url"], headers=AUTH_A).content == data


def test_a_pairsets_train_chains_one_training(client: TestClient, redis_client: Redis, settings: Settings) -> None:
    pairset_id = make_pairset(
        redis_client, train={"model": "tiny-qwen2.5-vl", "hyperparameters": {"lora_r": 4}, "checkpoint_every": 3}
    )
    tid = jobs.enqueue_training_for_pairset(redis_client, pairset_id, settings=settings)
    tr = client.get(f"/v1/trainings/{tid}", headers=AUTH_A).json()  # owned by the pair set's owner
    assert (tr["pairset_id"], tr["model"], tr["checkpoint_every"], tr["status"]) == (pairset_id, "tiny-qwen2.5-vl", 3, "queued")
    assert tr["hyperparameters"] == TrainHyperparameters(lora_r=4).to_dict()
    assert Job.fetch(jobs.training_job_id(tid), connection=redis_client).get_status() == "queued"
    ps = client.get(f"/v1/pairsets/{pairset_id}", headers=AUTH_A).json()
    assert ps["training_id"] == tid
    events = client.get(f"/v1/pairsets/{pairset_id}/events", headers=AUTH_A).json()["data"]
    assert [e["data"] for e in events if e["type"] == "training_created"] == [{"training_id": tid}]
    # A re-run of the caller finds the same training: no second record, job or event.
    assert jobs.enqueue_training_for_pairset(redis_client, pairset_id, settings=settings) == tid
    assert [t["id"] for t in client.get("/v1/trainings", headers=AUTH_A).json()["data"]] == [tid]
    assert len(client.get(f"/v1/pairsets/{pairset_id}/events", headers=AUTH_A).json()["data"]) == len(events)
    # Without `model`, the pair set's model.
    other = make_pairset(redis_client, train={})
    assert records.get(redis_client, records.TRAINING, jobs.enqueue_training_for_pairset(redis_client, other, settings=settings))["model"] == "tiny-llava"
    # The merge creates the record just before the pair set says succeeded, and enqueues the job after.
    third = make_pairset(redis_client, status="running", train={})
    created = jobs.create_training_for_pairset(redis_client, third)
    assert records.get(redis_client, records.PAIRSET, third)["training_id"] == created
    assert records.get(redis_client, records.TRAINING, created)["status"] == "queued"
    assert not redis_client.exists(Job.key_for(jobs.training_job_id(created)))
    assert jobs.enqueue_training_for_pairset(redis_client, third, settings=settings) == created
    assert Job.fetch(jobs.training_job_id(created), connection=redis_client).get_status() == "queued"
    untrained = make_pairset(redis_client)
    with pytest.raises(UserError, match="asked for no training"):
        jobs.enqueue_training_for_pairset(redis_client, untrained, settings=settings)


def test_delete_removes_a_finished_training_and_its_files(client: TestClient, redis_client: Redis, pairset_id: str, store: ArtifactStore) -> None:
    training_id = create(client, {"pairset_id": pairset_id}).json()["id"]
    folder = store.path("trainings", training_id, "output", "checkpoint-2")
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    r = client.delete(f"/v1/trainings/{training_id}", headers=AUTH_A)
    assert r.status_code == 409 and r.json()["error"]["code"] == "training_running"
    # The pair set it trains on cannot go either, while it runs.
    r = client.delete(f"/v1/pairsets/{pairset_id}", headers=AUTH_A)
    assert r.status_code == 409 and r.json()["error"]["code"] == "pairset_in_use"
    client.post(f"/v1/trainings/{training_id}/cancel", headers=AUTH_A)
    assert client.delete(f"/v1/trainings/{training_id}", headers=AUTH_B).status_code == 404
    assert client.delete(f"/v1/trainings/{training_id}", headers=AUTH_A).json() == {"id": training_id, "object": "training", "deleted": True}
    assert not store.path("trainings", training_id).exists()
    assert client.get(f"/v1/trainings/{training_id}", headers=AUTH_A).status_code == 404
    assert client.delete(f"/v1/pairsets/{pairset_id}", headers=AUTH_A).status_code == 200
