"""Trainings on the real stack: redis-server, `miadpo api`, `miadpo worker --queues cpu,gpu` and
`miadpo trainer` as processes, tiny-llava on CPU.

(a) A pair set created with `train` chains a training that succeeds; its metrics are visible while it
    runs; the adapter downloads (also by Range), loads with peft on a fresh base model and changes its
    logits. (b) A trainer SIGKILLed after the first checkpoint: a new trainer re-runs the abandoned job,
    which resumes from the latest complete checkpoint instead of starting over. Worker timings are
    scaled down as in test_workers_e2e.py.
"""

from __future__ import annotations

import io
import signal
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis
from rq.job import Job

from cli.services import free_port
from core import jobs
from core.client import zip_folder
from core.settings import Settings
from tests.e2e.conftest import Service, redis_db, service_env, wait_for
from tests.e2e.test_workers_e2e import FAST, _pids_with_env
from workers.sample_data import write_sample_data

KEY = "e2e-trainings-key"
A = {"Authorization": f"Bearer {KEY}"}
TERMINAL = ("succeeded", "failed", "cancelled")
FAST_LORA = {"lora_r": 8, "lora_alpha": 16, "learning_rate": 1e-3, "num_epochs": 1, "warmup_ratio": 0.0}
PAIRSET = {
    "augmentation": {"num": 16},
    "generation": {"max_new_tokens": 8, "batch_size": 8},
    "shard_size": 16,
    "seed": 7,
    "train": {"hyperparameters": {**FAST_LORA, "max_steps": 4}, "checkpoint_every": 2},
}
DOOMED = "MIADPO_TEST_TRAINER=doomed"
MAX_STEPS, EVERY = 16, 4  # the training that is killed


@dataclass
class Stack:
    client: httpx.Client
    conn: Redis
    data_dir: Path
    env: dict[str, str]
    root: Path
    dataset_id: str
    trainer: Service
    started: list[Service]

    def start(self, args: list[str], **extra: str) -> Service:
        service = Service(args, {**self.env, **extra}, self.root / f"{args[0]}-{len(self.started)}.log")
        self.started.append(service)
        return service



@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("trainings-e2e")
    url = redis_db(redis_url, 5)
    conn = Redis.from_url(url)
    conn.flushdb()
    # Retries without backoff (an abandoned job is re-queued at once); everything on cpu.
    env = service_env(root / "data", url, **FAST, MIADPO_API_KEYS=KEY, MIADPO_JOB_RETRY_INTERVALS="0", MIADPO_DEVICE="cpu")
    port = free_port()
    stack = Stack(httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60), conn, root / "data", env, root, "", None, [])  # type: ignore[arg-type]
    try:
        stack.start(["api", "--port", str(port)])
        stack.start(["worker", "--queues", "cpu,gpu"])
        stack.trainer = stack.start(["trainer"], MIADPO_TEST_TRAINER="doomed")
        wait_for(lambda: stack.client.get("/readyz").status_code == 200, 30, "the API to be ready")
        write_sample_data(root / "sample", num_samples=12, seed=0)
        r = stack.client.post("/v1/datasets", headers=A, files={"file": ("shapes.zip", zip_folder(root / "sample"))})
        assert r.status_code == 201, r.text
        stack.dataset_id = r.json()["id"]
        wait_for(lambda: _get(stack, f"/v1/datasets/{stack.dataset_id}")["status"] == "ready", 30, "ingest")
        yield stack
    finally:
        stack.client.close()
        for service in reversed(stack.started):
            service.stop()
            print(f"----- {' '.join(service.proc.args[3:])} -----\n{service.output()[-3000:]}")


def _get(stack: Stack, path: str) -> dict[str, Any]:
    r = stack.client.get(path, headers=A)
    assert r.status_code == 200, r.text
    return r.json()


def _events(stack: Stack, training_id: str) -> list[dict[str, Any]]:
    return _get(stack, f"/v1/trainings/{training_id}/events?limit=1000")["data"]


def _watch(stack: Stack, training_id: str, timeout: float, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """Poll the training until it has finished, keeping every answer in `seen`."""

    def finished() -> dict[str, Any] | None:
        tr = _get(stack, f"/v1/trainings/{training_id}")
        seen.append(tr)
        return tr if tr["status"] in TERMINAL else None

    return wait_for(finished, timeout, f"training {training_id} to finish", interval=0.1)  # type: ignore[return-value]


def test_a_pairset_with_train_chains_a_training_whose_adapter_works(stack: Stack, tmp_path: Path) -> None:
    started = time.monotonic()
    r = stack.client.post("/v1/pairsets", headers=A, json={"dataset_id": stack.dataset_id, **PAIRSET})
    assert r.status_code == 201, r.text
    pairset_id = r.json()["id"]

    def training_created() -> str | None:
        ps = _get(stack, f"/v1/pairsets/{pairset_id}")
        assert ps["status"] in ("queued", "running", "succeeded"), ps
        assert ps["training_id"] or ps["status"] != "succeeded", "succeeded without its training"
        return ps["training_id"]

    training_id: str = wait_for(training_created, 120, "the pair set to chain its training", interval=0.2)  # type: ignore[assignment]
    pairs_done = time.monotonic()
    ps = _get(stack, f"/v1/pairsets/{pairset_id}")
    assert ps["status"] == "succeeded" and ps["counts"]["pairs"] > 0, ps
    ps_events = _get(stack, f"/v1/pairsets/{pairset_id}/events")["data"]
    assert [e["data"] for e in ps_events if e["type"] == "training_created"] == [{"training_id": training_id}]
    # Before the final status event: a client streaming the pair set's events until it has finished sees it.
    assert [e["type"] for e in ps_events][-2:] == ["training_created", "status"]

    seen: list[dict[str, Any]] = []
    done = _watch(stack, training_id, 120, seen)
    trained = time.monotonic()
    assert done["status"] == "succeeded", done
    assert (done["pairset_id"], done["model"], done["checkpoint_every"]) == (pairset_id, "tiny-llava", 2)
    assert done["hyperparameters"]["lora_r"] == 8 and done["hyperparameters"]["max_steps"] == 4
    assert done["progress"] == {"step": 4, "total_steps": 4}
    assert done["checkpoints"] == {"count": 2, "last_step": 4}
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(done["metrics"])
    assert done["error"] is None and done["finished_at"] >= done["started_at"]
    # Metrics arrived while it ran, not only at the end.
    live = [t for t in seen if t["status"] == "running" and t["progress"]["step"] > 0 and "rewards/accuracies" in t["metrics"]]
    assert live, [(t["status"], t["progress"]) for t in seen]
    steps_seen = [t["progress"]["step"] for t in seen if t["status"] == "running"]
    assert steps_seen == sorted(steps_seen)

    events = _events(stack, training_id)
    kinds = [(e["type"], e["data"].get("status") or e["data"].get("step")) for e in events]
    assert kinds[:2] == [("created", "queued"), ("status", "running")] and kinds[-1] == ("status", "succeeded")
    assert [s for t, s in kinds if t == "checkpoint"] == [2, 4]
    step_events = [e["data"] for e in events if e["type"] == "step"]
    assert step_events[0]["step"] == 1 and step_events[-1]["step"] == 4
    assert all("rewards/margins" in e["metrics"] and e["total_steps"] == 4 for e in step_events)
    checkpoints = _get(stack, f"/v1/trainings/{training_id}/checkpoints")["data"]
    assert [c["step"] for c in checkpoints] == [2, 4] and all("loss" in c["metrics"] for c in checkpoints)

    # The adapter: a .tar.gz of its files, the size the record says; a Range request gets exactly those bytes.
    url = done["adapter"]["url"]
    r = stack.client.get(url, headers=A)
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    archive = r.content
    assert len(archive) == int(r.headers["content-length"]) == done["adapter"]["size_bytes"]
    r = stack.client.get(url, headers={**A, "Range": "bytes=100-1099"})
    assert r.status_code == 206 and r.content == archive[100:1100]
    assert r.headers["content-range"] == f"bytes 100-1099/{len(archive)}"
    r = stack.client.get(checkpoints[0]["url"], headers=A)
    assert r.status_code == 200 and r.content[:2] == b"\x1f\x8b"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp_path, filter="data")
    adapter = tmp_path / f"{training_id}-adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "processor_config.json", "tokenizer.json"):
        assert (adapter / name).is_file(), name

    # It loads on a freshly loaded base model (the tiny model the services built) and changes its logits.
    import torch
    from peft import PeftModel

    from trainer.data import load_pairs
    from workers.models import load_model

    handle = load_model("tiny-llava", Settings(data_dir=stack.data_dir))
    row = load_pairs(stack.data_dir / "pairsets" / pairset_id / "export", cache_dir=tmp_path / "cache")[0]
    text = handle.processor.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    inputs = handle.processor(text=[text], images=row["images"], return_tensors="pt")
    with torch.no_grad():
        base = handle.model(**inputs).logits
        adapted = PeftModel.from_pretrained(handle.model, adapter).eval()(**inputs).logits
    assert not torch.allclose(base, adapted, atol=1e-6)
    print(
        f"pair set with train: pairs {ps['counts']['pairs']} after {pairs_done - started:.1f} s, "
        f"training succeeded {trained - pairs_done:.1f} s later"
    )


@pytest.fixture(scope="module")
def pairset_id(stack: Stack) -> str:
    """A finished pair set (no training chained) for the tests that start trainings of their own: made by
    whichever needs it first, so every test passes alone and in any order."""
    body = {k: v for k, v in PAIRSET.items() if k != "train"}
    r = stack.client.post("/v1/pairsets", headers=A, json={"dataset_id": stack.dataset_id, **body})
    assert r.status_code == 201, r.text
    done = wait_for(lambda: (ps := _get(stack, f"/v1/pairsets/{r.json()['id']}"))["status"] in TERMINAL and ps, 120, "the pair set")
    assert done["status"] == "succeeded" and done["counts"]["pairs"] > 0, done  # type: ignore[index]
    return r.json()["id"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups, /proc and SIGKILL")
def test_a_training_whose_trainer_was_killed_resumes_from_its_checkpoint(stack: Stack, pairset_id: str) -> None:
    # Long enough to kill mid-run on a fast machine too (a tiny-llava step takes ~0.1-1 s).
    body = {"pairset_id": pairset_id, "hyperparameters": {**FAST_LORA, "max_steps": MAX_STEPS}, "checkpoint_every": EVERY}
    r = stack.client.post("/v1/trainings", headers=A, json=body)
    assert r.status_code == 201, r.text
    training_id = r.json()["id"]
    job_id = jobs.training_job_id(training_id)

    def first_checkpoint() -> bool:
        return bool(_get(stack, f"/v1/trainings/{training_id}/checkpoints")["data"])

    wait_for(first_checkpoint, 90, "the first checkpoint", interval=0.05)
    doomed_worker = Job.fetch(job_id, connection=stack.conn).worker_name
    stack.trainer.kill(signal.SIGKILL)  # the trainer and its scheduler; the work horse has its own group
    killed_at = time.monotonic()
    at_kill = _get(stack, f"/v1/trainings/{training_id}")
    saved = [c["step"] for c in _get(stack, f"/v1/trainings/{training_id}/checkpoints")["data"]]
    # The training's work horse dies with its trainer (PR_SET_PDEATHSIG): it never trains twice at once.
    wait_for(lambda: not _pids_with_env(DOOMED), 5, "the orphaned work horse to die")
    stack.trainer = stack.start(["trainer"])

    def rerun() -> bool:
        job = Job.fetch(job_id, connection=stack.conn)
        return job.get_status() in ("started", "finished") and job.worker_name not in (None, doomed_worker)

    wait_for(rerun, 90, "the new trainer to re-run the abandoned training", interval=0.1)
    rerun_after = time.monotonic() - killed_at
    seen: list[dict[str, Any]] = []
    done = _watch(stack, training_id, 150, seen)
    finished_after = time.monotonic() - killed_at
    assert done["status"] == "succeeded", done
    assert done["progress"] == {"step": MAX_STEPS, "total_steps": MAX_STEPS}
    all_saved = list(range(EVERY, MAX_STEPS + 1, EVERY))
    assert done["checkpoints"] == {"count": len(all_saved), "last_step": MAX_STEPS}
    assert [c["step"] for c in _get(stack, f"/v1/trainings/{training_id}/checkpoints")["data"]] == all_saved

    events = _events(stack, training_id)
    types = [e["type"] for e in events]
    retries = [e["data"] for e in events if e["type"] == "retry"]
    assert len(retries) == 1 and retries[0]["job"] == job_id and retries[0]["error"] == "AbandonedJobError"
    resumed = [i for i, t in enumerate(types) if t == "resumed"]
    assert len(resumed) == 1, types
    resumed_from = events[resumed[0]]["data"]["step"]
    # It went on from the latest complete checkpoint at the kill (or one completed just after it), not from zero.
    assert resumed_from >= max(saved) >= EVERY and resumed_from % EVERY == 0 and resumed_from < MAX_STEPS
    before = [e["data"]["step"] for e in events[: resumed[0]] if e["type"] == "step"]
    after = [e["data"]["step"] for e in events[resumed[0] :] if e["type"] == "step"]
    assert before and before[0] == 1 and at_kill["progress"]["step"] >= max(saved)  # (step events: at most ~1/s)
    assert after[0] == resumed_from + 1 > 1 and after[-1] == MAX_STEPS and after == sorted(after)
    assert types.count("status") == 2  # running once, succeeded once: the re-run did not start it again
    r = stack.client.get(done["adapter"]["url"], headers=A)
    assert r.status_code == 200 and len(r.content) == done["adapter"]["size_bytes"]
    print(
        f"trainer killed at step {at_kill['progress']['step']} (checkpoints {saved}); job re-run {rerun_after:.1f} s "
        f"after the kill, resumed from step {resumed_from} (first step logged after it: {after[0]}), "
        f"succeeded {finished_after:.1f} s after the kill; steps logged before {before}, after {after}"
    )


def test_cancelling_a_running_training_stops_it_after_a_step_saved_as_a_checkpoint(stack: Stack, pairset_id: str) -> None:
    body = {"pairset_id": pairset_id, "hyperparameters": {**FAST_LORA, "max_steps": 500}, "checkpoint_every": 100}
    training_id = stack.client.post("/v1/trainings", headers=A, json=body).json()["id"]
    wait_for(lambda: _get(stack, f"/v1/trainings/{training_id}")["progress"]["step"] >= 2, 60, "two steps", interval=0.05)
    r = stack.client.post(f"/v1/trainings/{training_id}/cancel", headers=A)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    job_id = jobs.training_job_id(training_id)
    wait_for(lambda: Job.fetch(job_id, connection=stack.conn).get_status() == "finished", 30, "the job to stop", interval=0.1)
    result = Job.fetch(job_id, connection=stack.conn).return_value()
    assert result["status"] == "cancelled" and 2 <= result["step"] < 500
    # The step it stopped after is saved (off the every-100 schedule), so no work is lost.
    assert [c["step"] for c in _get(stack, f"/v1/trainings/{training_id}/checkpoints")["data"]] == [result["step"]]
    tr = _get(stack, f"/v1/trainings/{training_id}")
    assert (tr["status"], tr["adapter"], tr["checkpoints"]) == ("cancelled", None, {"count": 1, "last_step": result["step"]})
    events = _events(stack, training_id)
    types = [e["type"] for e in events]
    # The terminal status is the stream's last event: the checkpoint saved after the cancel shows in the
    # record and the checkpoint list, not as an event after it.
    assert "retry" not in types and types.count("cancel_requested") == 1
    assert (types[-1], events[-1]["data"]["status"]) == ("status", "cancelled")
    assert stack.client.get(f"/v1/trainings/{training_id}/adapter", headers=A).status_code == 409


def test_a_training_with_evaluation_shows_base_and_adapter_and_an_evaluation_over_http_agrees(stack: Stack) -> None:
    """`train.evaluation` evaluates the base model and the adapter once the training succeeds; the training
    shows both. POST /v1/evaluations for the same training and prompts gives the same figures (same seed,
    same prompts, greedy answers), and its per-sample records are scored by the documented rule."""
    from workers.evaluate import score

    evaluation = {"dataset_id": stack.dataset_id, "num": 4, "max_new_tokens": 4, "seed": 1, "formats": ["sequence", "grid"]}
    body = {**PAIRSET, "augmentation": {"num": 8}, "seed": 3,
            "train": {"hyperparameters": {**FAST_LORA, "max_steps": 2}, "checkpoint_every": 2, "evaluation": evaluation}}  # fmt: skip
    pairset_id = stack.client.post("/v1/pairsets", headers=A, json={"dataset_id": stack.dataset_id, **body}).json()["id"]
    training_id: str = wait_for(lambda: _get(stack, f"/v1/pairsets/{pairset_id}")["training_id"], 120, "the training")  # type: ignore[assignment]

    def both_evaluated() -> dict[str, Any] | None:
        tr = _get(stack, f"/v1/trainings/{training_id}")
        assert tr["status"] in ("queued", "running", "succeeded"), tr
        ev = tr["evaluation"]
        done = ev and ev["base"] and ev["adapter"] and all(ev[k]["status"] == "succeeded" for k in ("base", "adapter"))
        return tr if done else None

    tr: dict[str, Any] = wait_for(both_evaluated, 240, "the training's two evaluations", interval=0.5)  # type: ignore[assignment]
    assert tr["evaluation"]["request"]["num"] == 4
    base, adapter = (tr["evaluation"][k] for k in ("base", "adapter"))
    for entry in (base, adapter):
        result = entry["result"]
        assert result["multi_image"]["n"] == result["single_image"]["n"] == 4
        assert set(result["multi_image"]["per_format"]) <= {"sequence", "grid"} and "normalised exact match" in result["matching_rule"]
    assert _get(stack, f"/v1/evaluations/{base['id']}")["training_id"] is None
    assert _get(stack, f"/v1/evaluations/{adapter['id']}")["training_id"] == training_id

    r = stack.client.post("/v1/evaluations", headers=A, json={**evaluation, "training_id": training_id})
    assert r.status_code == 201, r.text
    again = r.json()
    assert again["model"] == "tiny-llava" and again["config"]["training_id"] == training_id
    ev: dict[str, Any] = wait_for(
        lambda: (e := _get(stack, f"/v1/evaluations/{again['id']}"))["status"] in TERMINAL and e, 120, "the evaluation"
    )  # type: ignore[assignment]
    assert ev["status"] == "succeeded", ev
    assert ev["result"] == adapter["result"]
    samples = _get(stack, f"/v1/evaluations/{again['id']}/samples?limit=3")
    rest = _get(stack, f"/v1/evaluations/{again['id']}/samples?limit=3&after={samples['data'][-1]['uid']}")
    assert samples["has_more"] and not rest["has_more"] and len(samples["data"]) + len(rest["data"]) == 4
    for rec in samples["data"] + rest["data"]:
        assert (rec["correct"], rec["confused_with"]) == score(rec["answer"], rec["truths"], rec["target_index"])
        assert rec["truths"][rec["target_index"]] == rec["truth"] and rec["single"]["prompt"].startswith("<image>\n")
    assert stack.client.post(f"/v1/evaluations/{again['id']}/cancel", headers=A).status_code == 409
    # Another key sees none of it; a training that has not succeeded cannot be evaluated.
    assert stack.client.get(f"/v1/evaluations/{again['id']}", headers={"Authorization": "Bearer nope"}).status_code == 401
    r = stack.client.post("/v1/evaluations", headers=A, json={**evaluation, "training_id": "tr_doesnotexist"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "training_id"
