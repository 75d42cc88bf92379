"""Pair sets on the real stack: redis-server, `miadpo api`, a cpu worker and two gpu workers as processes.

One module-wide stack: an uninterrupted pair set (the reference, checked against `miadpo pairs` run in
one process with the same config and seed), a cancelled one, and one whose worker is SIGKILLed mid-shard
(its pairs must equal the reference's). Worker timings are scaled down as in test_workers_e2e.py.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
from redis import Redis
from rq.job import Job
from rq.worker import Worker

from cli.services import free_port
from core import jobs, records
from core.client import ApiError, Client, zip_folder
from core.exports import shard_path
from core.store import ArtifactStore
from tests.e2e.conftest import ROOT, Service, redis_db, service_env, wait_for
from tests.e2e.test_workers_e2e import FAST
from tests.pairs_check import check_pairs, read_shard_records, source_answers
from workers.models import BUILTINS
from workers.models.builtin import ensure_builtin
from workers.pipeline import read_records
from workers.sample_data import write_sample_data

KEY_A, KEY_B = "e2e-pairs-a", "e2e-pairs-b"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
NUM, MAX_NEW_TOKENS, SHARD_SIZE, BATCH_SIZE, SEED = 24, 8, 8, 4, 7
CONFIG = {
    "augmentation": {"num": NUM},
    "generation": {"max_new_tokens": MAX_NEW_TOKENS, "batch_size": BATCH_SIZE},
    "shard_size": SHARD_SIZE,
    "seed": SEED,
}
# Long enough to cancel half-way: 6 shards of 2 batches, longer answers.
LONG = {"augmentation": {"num": 48}, "generation": {"max_new_tokens": 24, "batch_size": BATCH_SIZE}, "shard_size": SHARD_SIZE, "seed": 1}
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Stack:
    client: httpx.Client
    conn: Redis
    data_dir: Path
    dataset_dir: Path
    dataset_id: str
    gpu_workers: list[Service]
    services: list[Service]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("pairsets-e2e")
    url = redis_db(redis_url, 4)
    conn = Redis.from_url(url)
    conn.flushdb()
    # Retries without backoff; workers on cpu whatever the machine, like `miadpo pairs`.
    env = service_env(
        root / "data", url, **FAST, MIADPO_API_KEYS=f"{KEY_A},{KEY_B}", MIADPO_JOB_RETRY_INTERVALS="0", MIADPO_DEVICE="cpu"
    )
    port = free_port()
    started: list[Service] = []
    # A model only the API can see (its config, in the API's MIADPO_MODELS_DIR): accepted at create time,
    # unknown to the workers, so a shard meets a user error (a deployment whose workers lag behind its API).
    api_models = root / "api-models" / "api-only-model"
    api_models.mkdir(parents=True)
    shutil.copy(ensure_builtin(BUILTINS["tiny-llava"], root / "data") / "config.json", api_models / "config.json")

    def start(args: list[str], **extra: str) -> Service:
        service = Service(args, {**env, **extra}, root / f"{args[0]}-{len(started)}.log")
        started.append(service)
        return service

    start(["api", "--port", str(port)], MIADPO_MODELS_DIR=str(api_models.parent))
    start(["worker", "--queues", "cpu"])
    gpu = [start(["worker", "--queues", "gpu"]) for _ in range(2)]
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        wait_for(lambda: client.get("/readyz").status_code == 200, 30, "the API to be ready")
        dataset_dir = root / "sample"
        write_sample_data(dataset_dir, num_samples=12, seed=0)
        r = client.post("/v1/datasets", headers=A, files={"file": ("shapes.zip", zip_folder(dataset_dir))})
        assert r.status_code == 201, r.text
        dataset_id = r.json()["id"]
        wait_for(lambda: client.get(f"/v1/datasets/{dataset_id}", headers=A).json()["status"] == "ready", 30, "ingest")
        yield Stack(client, conn, root / "data", dataset_dir, dataset_id, gpu, started)
    finally:
        client.close()
        for service in reversed(started):
            service.stop()
            print(f"----- {' '.join(service.proc.args[3:])} -----\n{service.output()[-3000:]}")


def _create(stack: Stack, body: dict[str, Any], headers: dict[str, str] = A) -> dict[str, Any]:
    r = stack.client.post("/v1/pairsets", headers=headers, json={"dataset_id": stack.dataset_id, **body})
    assert r.status_code == 201, r.text
    return r.json()


def _get(stack: Stack, pairset_id: str) -> dict[str, Any]:
    r = stack.client.get(f"/v1/pairsets/{pairset_id}", headers=A)
    assert r.status_code == 200, r.text
    return r.json()


def _wait_finished(stack: Stack, pairset_id: str, timeout: float = 90, seen: list[dict] | None = None) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        ps = _get(stack, pairset_id)
        if seen is not None:
            seen.append(ps)
        return ps if ps["status"] in TERMINAL else None

    return wait_for(finished, timeout, f"pair set {pairset_id} to finish", interval=0.2)  # type: ignore[return-value]


def _rows(parquet_dir: Path) -> list[dict[str, Any]]:
    """Every exported row (images included: a handful of small PNGs), in order."""
    rows: list[dict[str, Any]] = []
    for path in sorted(parquet_dir.glob("train-*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def _run_miadpo_pairs(stack: Stack, out: Path) -> subprocess.Popen:
    """`miadpo pairs` on the same dataset with the same config and seed: the pipeline in one process."""
    env = service_env(stack.data_dir, "redis://127.0.0.1:1/0")  # it needs no Redis
    args = ["--num", NUM, "--max-new-tokens", MAX_NEW_TOKENS, "--batch-size", BATCH_SIZE, "--shard-size", SHARD_SIZE, "--seed", SEED]
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "pairs", "--dataset", str(stack.dataset_dir), "--out", str(out), *map(str, args)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@dataclass
class Reference:
    """The uninterrupted pair set (CONFIG) and `miadpo pairs` run alongside it with the same config and seed."""

    created: dict[str, Any]
    done: dict[str, Any]
    seen: list[dict[str, Any]]
    elapsed: float
    pairs_output: str
    pairs_returncode: int
    pairs_dir: Path
    rows: list[dict[str, Any]]


@pytest.fixture(scope="module")
def reference(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """Made by whichever test needs it first, so every test passes alone and in any order."""
    pairs_dir = tmp_path_factory.mktemp("reference") / "pairs"
    started = time.monotonic()
    ps = _create(stack, CONFIG)
    reference_run = _run_miadpo_pairs(stack, pairs_dir)  # concurrently: both are mostly CPU
    seen: list[dict] = []
    done = _wait_finished(stack, ps["id"], seen=seen)
    elapsed = time.monotonic() - started
    output, _ = reference_run.communicate(timeout=120)
    rows = _rows(stack.data_dir / "pairsets" / ps["id"] / "export" / "data") if done["status"] == "succeeded" else []
    return Reference(ps, done, seen, elapsed, output, reference_run.returncode, pairs_dir, rows)


def test_a_pairset_runs_to_the_end_and_equals_the_single_process_run(stack: Stack, reference: Reference, tmp_path: Path) -> None:
    ps, done, seen, elapsed = reference.created, reference.done, reference.seen, reference.elapsed
    assert ps["status"] == "queued"
    assert done["status"] == "succeeded", done
    assert (done["stage"], done["error"]) == ("done", None)
    assert done["progress"] == {"done": NUM, "total": NUM}
    # Progress only grows while running, and never past the total.
    running = [p["progress"]["done"] for p in seen if p["status"] == "running" and p["progress"]["total"]]
    assert running == sorted(running) and all(0 <= d <= NUM for d in running)
    assert done["started_at"] is not None and done["finished_at"] >= done["started_at"]

    # Counts add up: every prompt judged, pairs = selected - removed.
    counts = done["counts"]
    store = ArtifactStore(stack.data_dir)
    shard_records = list(read_records([shard_path(store, ps["id"], i) for i in range(NUM // SHARD_SIZE)]))
    selected = sum(1 for rec in shard_records if rec["stats"] is not None)
    assert counts["prompts"] == NUM == len(shard_records)
    assert counts["candidates"] == NUM  # one greedy candidate per prompt
    assert counts["hallucinated"] == sum(any(c["hallucinated"] for c in rec["candidates"]) for rec in shard_records)
    assert counts["pairs"] == selected - sum(counts["removed"].values()) > 0

    events = stack.client.get(f"/v1/pairsets/{ps['id']}/events", headers=A).json()["data"]
    stages = [(e["type"], e["data"].get("status"), e["data"].get("stage")) for e in events if e["type"] in ("status", "stage")]
    assert stages == [
        ("status", "running", "generate"),
        ("stage", None, "select"),
        ("stage", None, "export"),
        ("status", "succeeded", "done"),
    ]
    assert events[0]["type"] == "created" and any(e["type"] == "progress" for e in events)

    # The preview, page by page, without images; every image URL serves a PNG.
    previews: list[dict[str, Any]] = []
    after = None
    while True:
        params = {"limit": 5, **({"after": after} if after else {})}
        page = stack.client.get(f"/v1/pairsets/{ps['id']}/pairs", headers=A, params=params).json()
        previews.extend(page["data"])
        if not page["has_more"]:
            break
        after = page["data"][-1]["uid"]
    assert len(previews) == counts["pairs"]
    first = previews[0]
    assert set(first) == {
        "uid", "source_id", "format", "n_images", "target_index", "prompt", "chosen", "rejected",
        "attention_ratio", "perplexity", "length_ratio", "edit_distance", "image_urls",
    }  # fmt: skip
    assert first["prompt"].count("<image>") == first["n_images"] == len(first["image_urls"])
    r = stack.client.get(first["image_urls"][-1], headers=A)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert stack.client.get(first["image_urls"][-1]).status_code == 401  # auth applies
    assert stack.client.get(f"/v1/pairsets/{ps['id']}/pairs/{first['uid']}/images/{first['n_images']}", headers=A).status_code == 404

    # The download: a .tar.gz with its length, built once; a Range request gets exactly those bytes.
    r = stack.client.get(f"/v1/pairsets/{ps['id']}/download", headers=A)
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    archive = r.content
    assert int(r.headers["content-length"]) == len(archive)
    r = stack.client.get(f"/v1/pairsets/{ps['id']}/download", headers={**A, "Range": "bytes=100-1099"})
    assert r.status_code == 206 and r.content == archive[100:1100]
    assert r.headers["content-range"] == f"bytes 100-1099/{len(archive)}"
    assert stack.client.get(f"/v1/pairsets/{ps['id']}/download", headers=A).content == archive  # cached
    extracted = tmp_path / "download"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(extracted, filter="data")
    export = extracted / ps["id"]
    assert (export / "README.md").is_file() and list((export / "histograms").glob("*.png"))

    from datasets import load_dataset

    loaded = load_dataset("parquet", data_files=str(export / "data" / "*.parquet"), split="train")
    assert len(loaded) == counts["pairs"]
    assert loaded[0]["uid"] == first["uid"] and loaded[0]["images"][0].mode == "RGB"
    assert loaded[0]["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": first["chosen"]}]}]

    # The same pairs, byte for byte, as the pipeline run in one process.
    output = reference.pairs_output
    assert reference.pairs_returncode == 0, output
    assert f"pairs selected {selected}," in output and f"pairs {counts['pairs']}" in output
    service_rows = _rows(export / "data")
    assert service_rows == reference.rows == _rows(reference.pairs_dir / "export" / "data")
    print(f"service pair set: {elapsed:.1f} s from create to succeeded ({counts['pairs']} pairs)")

    # Another key sees none of it.
    for path in ("", "/events", "/pairs", "/download", f"/pairs/{first['uid']}/images/0"):
        r = stack.client.get(f"/v1/pairsets/{ps['id']}{path}", headers=B)
        assert r.status_code == 404 and r.json()["error"]["code"] == "pairset_not_found", path
    assert stack.client.post(f"/v1/pairsets/{ps['id']}/cancel", headers=B).status_code == 404
    assert stack.client.post(f"/v1/pairsets/{ps['id']}/cancel", headers=A).status_code == 409


def _job_statuses(stack: Stack, pairset_id: str, num_shards: int) -> dict[str, str]:
    statuses = {}
    for job_id in jobs.pairset_job_ids(pairset_id, num_shards):
        try:
            statuses[job_id] = Job.fetch(job_id, connection=stack.conn).get_status().value
        except Exception:
            statuses[job_id] = "missing"
    return statuses


def test_cancel_stops_running_shards_and_drops_queued_ones(stack: Stack) -> None:
    ps = _create(stack, LONG)
    num_shards = 48 // SHARD_SIZE
    wait_for(lambda: _get(stack, ps["id"])["progress"]["done"] > 0, 60, "the first batch", interval=0.1)
    # Nothing waits for it before it asks: the pair set is cancelled at once.
    r = stack.client.post(f"/v1/pairsets/{ps['id']}/cancel", headers=A)
    cancelled_at = time.monotonic()
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert r.json()["finished_at"] is not None

    def nothing_runs() -> bool:
        statuses = _job_statuses(stack, ps["id"], num_shards)
        return not any(s in ("started", "queued", "scheduled") for s in statuses.values())

    wait_for(nothing_runs, 20, "the running shard jobs to stop", interval=0.1)
    print(f"shard jobs stopped {time.monotonic() - cancelled_at:.1f} s after the cancel")
    statuses = _job_statuses(stack, ps["id"], num_shards)
    assert statuses[jobs.pairset_merge_job_id(ps["id"])] == "canceled"
    shard_states = [statuses[jobs.pairset_shard_job_id(ps["id"], i)] for i in range(num_shards)]
    assert "canceled" in shard_states and "finished" not in shard_states[-2:], shard_states
    # No further progress, no retries, no export.
    progress, per_shard = _get(stack, ps["id"])["progress"], records.shard_progress(stack.conn, ps["id"])
    time.sleep(2)
    after = _get(stack, ps["id"])
    assert (after["status"], after["error"], after["progress"]) == ("cancelled", None, progress)
    assert records.shard_progress(stack.conn, ps["id"]) == per_shard
    assert progress["done"] < progress["total"]
    events = stack.client.get(f"/v1/pairsets/{ps['id']}/events", headers=A, params={"limit": 1000}).json()["data"]
    assert "retry" not in [e["type"] for e in events]
    assert [e["type"] for e in events].count("cancel_requested") == 1
    assert not (stack.data_dir / "pairsets" / ps["id"] / "export").exists()
    assert stack.client.get(f"/v1/pairsets/{ps['id']}/pairs", headers=A).status_code == 409


def _worker_of(stack: Stack, service: Service) -> Worker:
    for worker in Worker.all(connection=stack.conn):
        if worker.pid == service.proc.pid:
            return worker
    raise AssertionError("worker not registered")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and SIGKILL")
def test_a_shard_whose_worker_was_killed_is_rerun_and_the_pairs_are_the_same(stack: Stack, reference: Reference) -> None:
    assert reference.done["status"] == "succeeded", reference.done
    doomed = stack.gpu_workers[0]
    doomed_worker = _worker_of(stack, doomed)
    ps = _create(stack, CONFIG)

    def mid_shard() -> str | None:
        job_id = doomed_worker.get_current_job_id()
        match = re.fullmatch(rf"pairset-{ps['id']}-shard-(\d+)", job_id or "")
        if match is None:
            return None
        done = records.shard_progress(stack.conn, ps["id"]).get(int(match.group(1)), 0)
        return job_id if 0 < done < SHARD_SIZE else None

    job_id: str = wait_for(mid_shard, 60, "a worker to be half-way through a shard", interval=0.02)  # type: ignore[assignment]
    doomed.kill(signal.SIGKILL)
    killed_at = time.monotonic()

    def rerun_elsewhere() -> bool:
        job = Job.fetch(job_id, connection=stack.conn)
        return job.get_status() in ("started", "finished") and job.worker_name not in (None, doomed_worker.name)

    wait_for(rerun_elsewhere, 120, "another worker to re-run the abandoned shard", interval=0.1)
    rerun = time.monotonic() - killed_at
    done = _wait_finished(stack, ps["id"])
    print(f"abandoned shard re-run {rerun:.1f} s after its worker was killed; pair set done {time.monotonic() - killed_at:.1f} s after")
    assert done["status"] == "succeeded", done
    assert done["progress"] == {"done": NUM, "total": NUM}  # the re-run shard is counted once
    assert done["counts"] == reference.done["counts"]
    events = stack.client.get(f"/v1/pairsets/{ps['id']}/events", headers=A).json()["data"]
    retries = [e["data"] for e in events if e["type"] == "retry"]
    assert retries and retries[0]["job"] == job_id and retries[0]["error"] == "AbandonedJobError"
    assert _rows(stack.data_dir / "pairsets" / ps["id"] / "export" / "data") == reference.rows


def test_a_user_error_in_a_shard_fails_the_pairset_and_stops_the_rest(stack: Stack) -> None:
    ps = _create(stack, {**CONFIG, "model": "api-only-model"})
    done = _wait_finished(stack, ps["id"], timeout=60)
    assert done["status"] == "failed" and done["error"]["code"] == "model_not_found", done
    assert "api-only-model" in done["error"]["message"]
    num_shards = NUM // SHARD_SIZE

    def settled() -> dict[str, str] | None:
        statuses = _job_statuses(stack, ps["id"], num_shards)
        return None if any(s in ("started", "queued", "scheduled") for s in statuses.values()) else statuses

    statuses: dict[str, str] = wait_for(settled, 20, "the other shard jobs to stop")  # type: ignore[assignment]
    assert statuses[jobs.pairset_merge_job_id(ps["id"])] == "canceled"  # never left waiting
    events = stack.client.get(f"/v1/pairsets/{ps['id']}/events", headers=A).json()["data"]
    assert "retry" not in [e["type"] for e in events]  # bad input is not retried


def _sse_events(response: httpx.Response, on_event: Any = None) -> list[dict[str, Any]]:
    """Read a server-sent event stream to its end, calling `on_event(event)` as each one arrives."""
    events: list[dict[str, Any]] = []
    for block in _sse_blocks(response):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "data" in fields:
            event = json.loads(fields["data"])
            assert (event["id"], event["type"]) == (fields["id"], fields["event"])
            events.append(event)
            if on_event is not None:
                on_event(event)
    return events


def _sse_blocks(response: httpx.Response) -> Iterator[str]:
    buffer = ""
    for text in response.iter_text():
        buffer += text
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            if block.strip():
                yield block


def test_the_client_follows_a_qwen_pairset_with_several_candidates_and_downloads_it(stack: Stack, tmp_path: Path) -> None:
    """The README's client path on the other family: upload a folder, wait, create a pair set with 2 sampled
    candidates per prompt, follow its event stream while it runs, wait, download; the pairs hold what they must."""
    num, shard_size, candidates = 8, 4, 2
    with Client(str(stack.client.base_url), KEY_A) as client:
        dataset = client.upload_dataset(stack.dataset_dir, name="shapes via the client")
        assert dataset["status"] == "validating"
        dataset = client.wait_dataset(dataset["id"], poll_s=0.2, timeout_s=60)
        assert (dataset["status"], dataset["num_samples"]) == ("ready", 12), dataset
        with pytest.raises(ApiError) as info:
            client.get("/v1/pairsets/ps_doesnotexist")
        assert (info.value.status, info.value.code) == (404, "pairset_not_found")

        ps = client.create_pairset(
            dataset_id=dataset["id"], model="tiny-qwen2.5-vl", augmentation={"num": num}, shard_size=shard_size, seed=3,
            generation={"max_new_tokens": 8, "batch_size": 2, "num_candidates": candidates, "temperature": 1.0},
        )
        # The stream, opened at once and read while the pair set runs; the state of the pair set is looked up
        # as its first progress event arrives: the events come as it goes, not in one piece at the end.
        status_at_first_progress: list[str] = []

        def look(event: dict[str, Any]) -> None:
            if event["type"] == "progress" and not status_at_first_progress:
                status_at_first_progress.append(client.get(f"/v1/pairsets/{ps['id']}")["status"])

        headers = {**A, "Accept": "text/event-stream"}
        with stack.client.stream("GET", f"/v1/pairsets/{ps['id']}/events", headers=headers, timeout=180) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = _sse_events(r, look)  # ends by itself once the pair set has finished
        assert status_at_first_progress == ["running"], events
        assert events[0]["type"] == "created" and events[-1]["type"] == "status"
        assert events[-1]["data"]["status"] == "succeeded", events[-1]
        done_counts = [e["data"]["done"] for e in events if e["type"] == "progress"]
        assert done_counts and done_counts == sorted(done_counts) and done_counts[-1] <= num  # (at most one per 2 s)

        seen: list[dict[str, Any]] = []
        done = client.wait_pairset(ps["id"], on_update=seen.append, poll_s=0.2, timeout_s=60)
        assert done["status"] == "succeeded" and seen[-1] == done and done["model"] == "tiny-qwen2.5-vl"
        assert done["counts"]["candidates"] == num * candidates and done["counts"]["pairs"] > 0
        archive = client.download(f"/v1/pairsets/{ps['id']}/download", tmp_path / "pairs.tar.gz")
    assert archive.read_bytes() == stack.client.get(f"/v1/pairsets/{ps['id']}/download", headers=A).content
    assert not list(tmp_path.glob("*.part"))
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    rows = _rows(tmp_path / "x" / ps["id"] / "data")
    assert len(rows) == done["counts"]["pairs"]
    store = ArtifactStore(stack.data_dir)
    shards = read_shard_records([shard_path(store, ps["id"], i) for i in range(num // shard_size)])
    check_pairs(rows, shards, source_answers(stack.dataset_dir), candidates)
