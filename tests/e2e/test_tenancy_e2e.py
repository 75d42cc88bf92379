"""A key can reach its own resources and nothing else (issue 13), tried over HTTP against the real stack
as an untrusted tenant would: redis-server, `miadpo api`, a cpu worker and one gpu worker as processes.

Each thing a tenant could do before gets a 4xx with the error envelope, or a bounded, clean close; nothing
is left on disk; and with two keys the gpu worker shares itself between them (fair scheduling).
One module-wide stack; the raw-socket tests speak HTTP/1.1 by hand, as a hostile client would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis
from rq.job import Job

from cli.services import free_port
from core import jobs, records
from core.client import zip_folder
from tests.e2e.conftest import Service, redis_db, service_env, wait_for
from tests.e2e.test_workers_e2e import FAST
from workers.sample_data import write_sample_data

KEY_A, KEY_B = "e2e-tenant-a", "e2e-tenant-b"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
IDLE_TIMEOUT_S = 2
TERMINAL = ("succeeded", "failed", "cancelled")
# Fairness: key A's pair set is many shards, key B's one; one gpu worker serves both.
SHARD = {"generation": {"max_new_tokens": 8, "batch_size": 4}, "shard_size": 4, "seed": 3}
LARGE = {**SHARD, "augmentation": {"num": 6 * 4}}
SMALL = {**SHARD, "augmentation": {"num": 4}}


@dataclass
class Stack:
    client: httpx.Client
    conn: Redis
    port: int
    data_dir: Path
    datasets: dict[str, str]  # key -> a ready dataset of that key
    services: list[Service]

    @property
    def incoming(self) -> list[Path]:
        folder = self.data_dir / "uploads" / ".incoming"
        return sorted(folder.iterdir()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("tenancy-e2e")
    url = redis_db(redis_url, 7)
    conn = Redis.from_url(url)
    conn.flushdb()
    data_dir = root / "data"
    # What a crashed API left behind: swept when the API starts.
    leftover = data_dir / "uploads" / ".incoming" / "0123abcd"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"x" * 1000)
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    env = service_env(
        data_dir,
        url,
        **FAST,
        MIADPO_API_KEYS=f"{KEY_A},{KEY_B}",
        MIADPO_JOB_RETRY_INTERVALS="0",
        MIADPO_DEVICE="cpu",
        MIADPO_BODY_IDLE_TIMEOUT_S=str(IDLE_TIMEOUT_S),
        MIADPO_MAX_UPLOAD_BYTES=str(1024 * 1024),
        MIADPO_MAX_RUNNING_PAIRSETS_PER_KEY="1",
    )
    port = free_port()
    started: list[Service] = []

    def start(args: list[str]) -> Service:
        service = Service(args, env, root / f"{args[0]}-{len(started)}.log")
        started.append(service)
        return service

    start(["api", "--port", str(port)])
    start(["worker", "--queues", "cpu"])
    start(["worker", "--queues", "gpu"])
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        wait_for(lambda: client.get("/readyz").status_code == 200, 30, "the API to be ready")
        write_sample_data(root / "sample", num_samples=12, seed=0)
        archive = zip_folder(root / "sample")
        datasets = {}
        for key, headers in ((KEY_A, A), (KEY_B, B)):
            r = client.post("/v1/datasets", headers=headers, files={"file": ("shapes.zip", archive)})
            assert r.status_code == 201, r.text
            datasets[key] = r.json()["id"]
        for key, headers in ((KEY_A, A), (KEY_B, B)):
            wait_for(lambda: client.get(f"/v1/datasets/{datasets[key]}", headers=headers).json()["status"] == "ready", 60, "ingest")  # noqa: B023
        yield Stack(client, conn, port, data_dir, datasets, started)
    finally:
        client.close()
        for service in reversed(started):
            service.stop()
            print(f"----- {' '.join(service.proc.args[3:])} -----\n{service.output()[-3000:]}")


def _error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"type", "code", "message", "param"}
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def _pairset(stack: Stack, body: dict[str, Any], headers: dict[str, str] = A) -> httpx.Response:
    key = headers["Authorization"].split()[1]
    return stack.client.post("/v1/pairsets", headers=headers, json={"dataset_id": stack.datasets[key], **body})


def _raw(port: int, data: bytes, *, wait_s: float = 30) -> tuple[bytes, float, bool]:
    """Send `data` on a fresh connection and read until the server closes it (or `wait_s` passes).
    Returns what came back, how long the answer took to start, and whether the server closed the connection."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(wait_s)
        started = time.monotonic()
        sock.sendall(data)
        got = b""
        first = float("inf")
        closed = False
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                first = min(first, time.monotonic() - started)
                got += chunk
            closed = True
        return got, first, closed


def _status(response: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3})", response)
    assert match, response[:200]
    return int(match.group(1))


class _Recorder(BaseHTTPRequestHandler):
    calls: list[str] = []

    def do_POST(self) -> None:  # noqa: N802
        _Recorder.calls.append(self.path)
        self.send_response(400)
        self.end_headers()
        self.wfile.write(b'{"error": {"message": "secret from the host"}}')

    def log_message(self, *args: Any) -> None:
        pass


def test_the_worker_never_calls_a_url_a_tenant_sends(stack: Stack) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    before = [p["id"] for p in stack.client.get("/v1/pairsets", headers=A, params={"limit": 100}).json()["data"]]
    try:
        _error(_pairset(stack, {"generation": {"backend": "openai", "base_url": url}}), 422, "generation.base_url", "extra_forbidden")
        _error(_pairset(stack, {"generation": {"backend": "openai", "endpoint": url}}), 422, "generation.endpoint")
        _error(_pairset(stack, {"generation": {"backend": "openai", "endpoint": "local"}}), 422, "generation.endpoint", "unknown_endpoint")
        _error(_pairset(stack, {"generation": {"backend": "openai"}}), 422, "generation.endpoint", "no_endpoint")
    finally:
        server.shutdown()
    assert _Recorder.calls == []
    # Nothing was created (other tests of the module may have made pair sets of this key before).
    assert [p["id"] for p in stack.client.get("/v1/pairsets", headers=A, params={"limit": 100}).json()["data"]] == before


@pytest.mark.parametrize("model", ["/etc/passwd", "/root", "/nonexistent", "../../etc/passwd", "etc/passwd", "root", "passwd"])
def test_a_model_is_a_name_and_the_answer_tells_nothing_of_the_host(stack: Stack, model: str) -> None:
    error = _error(_pairset(stack, {"model": model}), 422, "model")
    assert error["code"] in ("string_pattern_mismatch", "model_not_found")
    assert "root:" not in error["message"] and "No such file" not in error["message"] and "directory" not in error["message"]
    for body in ({"pairset_id": "ps_x", "model": model}, {"dataset_id": stack.datasets[KEY_A], "model": model}):
        path = "/v1/trainings" if "pairset_id" in body else "/v1/evaluations"
        r = stack.client.post(path, headers=A, json=body)
        assert r.status_code in (404, 422), r.text  # 404: no such pair set (checked first), never a model's file


def test_refused_uploads_leave_nothing_on_disk(stack: Stack) -> None:
    assert stack.incoming == []  # the leftover of a crashed API was swept at start
    files = {"file": ("x.jsonl", b'{"id": "1", "image": "a.png", "question": "q", "answer": "a"}\n' * 100)}
    # Refused after the body was received: a header too long, a bad form field.
    _error(stack.client.post("/v1/datasets", headers={**A, "Idempotency-Key": "k" * 300}, files=files), 422, "Idempotency-Key")
    _error(stack.client.post("/v1/datasets", headers=A, files=files, data={"format": "csv"}), 422, "format")
    # Too large: from Content-Length, and as the bytes arrive (a chunked body declares none).
    _error(stack.client.post("/v1/datasets", headers=A, files={"file": ("x.zip", b"0" * (2 * 1024 * 1024))}), 413)
    big = iter([b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.zip\"\r\n\r\n", *[b"0" * 65536] * 40])
    r = stack.client.post("/v1/datasets", headers={**A, "Content-Type": "multipart/form-data; boundary=b"}, content=big)
    _error(r, 413)
    # No key: refused before a byte is read.
    _error(stack.client.post("/v1/datasets", files=files), 401, "Authorization", "missing_api_key")
    assert stack.incoming == []


def test_a_client_that_drops_mid_upload_is_no_server_error(stack: Stack) -> None:
    head = (
        f"POST /v1/datasets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 900000\r\n\r\n"
    ).encode()
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.zip"\r\n\r\n' + b"0" * 300_000
    with socket.create_connection(("127.0.0.1", stack.port)) as sock:
        sock.sendall(head + part)
        wait_for(lambda: stack.incoming, 10, "the upload to reach the disk")
    wait_for(lambda: not stack.incoming, 10, "the dropped upload's file to be removed")
    metrics = stack.client.get("/metrics").text
    assert not re.search(r'miadpo_http_requests_total\{method="POST",route="/v1/datasets",status="5\d\d"\}', metrics)


def test_no_body_is_read_before_the_key_is_checked_nor_past_the_limit(stack: Stack) -> None:
    # 400 MB declared, a few bytes sent: the 401 comes at once, the rest is never waited for.
    head = b"POST /v1/pairsets HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 400000000\r\n\r\n{"
    got, took, closed = _raw(stack.port, head, wait_s=30)
    assert _status(got) == 401 and b'"missing_api_key"' in got and took < IDLE_TIMEOUT_S and closed
    # With a key, 200 MB declared: 413 from the header alone.
    head = (
        f"POST /v1/pairsets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n"
        "Content-Type: application/json\r\nContent-Length: 200000000\r\n\r\n{"
    ).encode()
    got, took, closed = _raw(stack.port, head, wait_s=30)
    assert _status(got) == 413 and b'"body_too_large"' in got and took < IDLE_TIMEOUT_S and closed
    # A JSON body over the limit without a Content-Length (chunked): 413 once the limit is passed.
    chunks = iter([b'{"dataset_id": "' + b"x" * 65536] * 40)
    _error(stack.client.post("/v1/pairsets", headers={**A, "Content-Type": "application/json"}, content=chunks), 413)


def test_a_short_body_does_not_hold_the_connection(stack: Stack) -> None:
    head = (
        f"POST /v1/pairsets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"dataset_id\": "
    ).encode()
    got, took, closed = _raw(stack.port, head, wait_s=IDLE_TIMEOUT_S + 20)
    assert _status(got) == 408 and b'"body_timeout"' in got
    assert closed and IDLE_TIMEOUT_S <= took < IDLE_TIMEOUT_S + 20
    # The same for an upload: and its partial file is gone.
    head = (
        f"POST /v1/datasets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 500000\r\n\r\n"
    ).encode() + b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.zip"\r\n\r\n' + b"0" * 1000
    got, took, closed = _raw(stack.port, head, wait_s=IDLE_TIMEOUT_S + 20)
    assert _status(got) == 408 and closed
    assert stack.incoming == []


@pytest.mark.parametrize(
    ("hyperparameters", "param", "code"),
    [
        ({"max_steps": 10**12}, "max_steps", "less_than_equal"),
        ({"max_steps": 10**6}, "max_steps", "too_many_steps"),
        ({"num_epochs": 10**9}, "num_epochs", "less_than_equal"),
        ({"num_epochs": 1000, "per_device_batch_size": 1}, "num_epochs", "too_many_steps"),
        ({"lora_r": 10**9}, "lora_r", "less_than_equal"),
        ({"lora_target": ".*vision_tower.*nothing"}, "lora_target", "lora_target_matches_nothing"),
        ({"max_length": 1}, "max_length", "max_length_too_small"),
    ],
)
def test_a_training_that_would_hold_the_trainer_or_fail_late_is_refused_at_once(
    stack: Stack, hyperparameters: dict, param: str, code: str
) -> None:
    body = {**LARGE, "train": {"hyperparameters": hyperparameters, "checkpoint_every": 1}}
    error = _error(_pairset(stack, body), 422, f"train.hyperparameters.{param}", code)
    assert "see the worker log" not in error["message"]


def test_an_event_cursor_past_2_64_is_a_4xx_and_the_stream_stays_sane(stack: Stack) -> None:
    r = _pairset(stack, {**SMALL, "augmentation": {"num": 1}}, headers=B)
    assert r.status_code == 201, r.text
    pairset_id = r.json()["id"]
    path = f"/v1/pairsets/{pairset_id}/events"
    too_big = "18446744073709551616-0"
    _error(stack.client.get(path, headers=B, params={"after": too_big}), 422, "after", "event_id_out_of_range")
    _error(stack.client.get(path, headers={**B, "Last-Event-ID": too_big}), 422, "Last-Event-ID", "event_id_out_of_range")
    sse = {**B, "Accept": "text/event-stream"}
    _error(stack.client.get(path, headers={**sse, "Last-Event-ID": too_big}), 422, "Last-Event-ID")
    last = f"{2**64 - 1}-{2**64 - 1}"
    assert stack.client.get(path, headers=B, params={"after": last}).json()["data"] == []
    wait_for(lambda: stack.client.get(f"/v1/pairsets/{pairset_id}", headers=B).json()["status"] in TERMINAL, 120, "the pair set")
    with stack.client.stream("GET", path, headers={**sse, "Last-Event-ID": last}) as stream:
        assert stream.status_code == 200 and stream.read() == b""  # nothing after the last id, then a clean end


def _shards(conn: Redis, pairset_id: str, n: int) -> list[Job]:
    return [Job.fetch(jobs.pairset_shard_job_id(pairset_id, i), connection=conn) for i in range(n)]


def test_two_keys_share_the_gpu_worker_fairly_and_quotas_hold(stack: Stack) -> None:
    """Key A's large pair set is running on the only gpu worker when key B asks for a small one: B's shard is
    the next one the worker takes (within about one of A's shards), not the ninth."""
    r = _pairset(stack, LARGE)
    assert r.status_code == 201, r.text
    large = r.json()["id"]
    n_large = LARGE["augmentation"]["num"] // SHARD["shard_size"]
    # A second unfinished pair set of key A is over its quota (1 in this stack): 429, with the envelope.
    error = _error(_pairset(stack, SMALL), 429, code="too_many_running_pairsets")
    assert error["type"] == "quota_error"
    wait_for(lambda: stack.client.get(f"/v1/pairsets/{large}", headers=A).json()["progress"]["done"] > 0, 120, "A's first shard")
    r = _pairset(stack, SMALL, headers=B)
    assert r.status_code == 201, r.text
    small = r.json()["id"]
    wait_for(lambda: stack.client.get(f"/v1/pairsets/{small}", headers=B).json()["status"] in TERMINAL, 300, "B's pair set")
    assert stack.client.get(f"/v1/pairsets/{small}", headers=B).json()["status"] == "succeeded"
    [b_shard] = _shards(stack.conn, small, 1)
    assert b_shard.origin != jobs.GPU and b_shard.origin.startswith(jobs.KEY_QUEUE_PREFIX)
    a_started = sorted(j.started_at for j in _shards(stack.conn, large, n_large) if j.started_at)
    before = [t for t in a_started if t <= b_shard.enqueued_at]  # A's shards already running when B's was queued
    after = [t for t in a_started if t > b_shard.enqueued_at]
    assert before and after, (before, after)  # B came while A was mid-way
    # At most one of A's shards started between B's shard being queued and starting: the one that may have
    # been picked in the instant between the two.
    assert b_shard.started_at <= after[min(1, len(after) - 1)], (b_shard.enqueued_at, b_shard.started_at, a_started)
    gaps = [(b - a).total_seconds() for a, b in zip(a_started, a_started[1:], strict=False)]
    waited = (b_shard.started_at - b_shard.enqueued_at).total_seconds()
    print(f"B's shard started {waited:.1f} s after it was queued; A's shards start {min(gaps):.1f}-{max(gaps):.1f} s apart; "
          f"A's shards started before B's was queued {len(before)}, between queued and started {sum(t < b_shard.started_at for t in after)}")
    assert stack.client.post(f"/v1/pairsets/{large}/cancel", headers=A).status_code in (200, 409)  # done with it


def _refs(stack: Stack, dataset_id: str) -> set[str]:
    lines = (stack.data_dir / "datasets" / dataset_id / "samples.jsonl").read_text().splitlines()
    return {json.loads(line)["image"] for line in lines if line.strip()}


def _image(stack: Stack, ref: str) -> Path:
    return stack.data_dir / "images" / ref[:2] / ref[2:4] / ref


def test_delete_removes_files_and_images_are_counted(stack: Stack, tmp_path: Path) -> None:
    write_sample_data(tmp_path / "other", num_samples=6, seed=11)
    archive = zip_folder(tmp_path / "other")
    ids = []
    for _ in range(2):  # two datasets of the same images
        r = stack.client.post("/v1/datasets", headers=B, files={"file": ("other.zip", archive)})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    for dataset_id in ids:
        wait_for(lambda: stack.client.get(f"/v1/datasets/{dataset_id}", headers=B).json()["status"] == "ready", 60, "ingest")  # noqa: B023
    refs = _refs(stack, ids[0])
    shared = set().union(*(_refs(stack, d) for d in stack.datasets.values()))  # used by the stack's datasets too
    assert refs - shared and all(_image(stack, ref).is_file() for ref in refs)
    # A pair set on the first dataset, finished, then deleted with its files.
    r = stack.client.post("/v1/pairsets", headers=B, json={"dataset_id": ids[0], **SMALL, "augmentation": {"num": 2}})
    assert r.status_code == 201, r.text
    pairset_id = r.json()["id"]
    _error(stack.client.delete(f"/v1/pairsets/{pairset_id}", headers=B), 409, code="pairset_running")
    wait_for(lambda: stack.client.get(f"/v1/pairsets/{pairset_id}", headers=B).json()["status"] in TERMINAL, 120, "the pair set")
    assert (stack.data_dir / "pairsets" / pairset_id).is_dir()
    _error(stack.client.delete(f"/v1/pairsets/{pairset_id}", headers=A), 404)  # another key's: not found
    assert stack.client.delete(f"/v1/pairsets/{pairset_id}", headers=B).json() == {"id": pairset_id, "object": "pairset", "deleted": True}
    assert not (stack.data_dir / "pairsets" / pairset_id).exists()
    _error(stack.client.get(f"/v1/pairsets/{pairset_id}", headers=B), 404)
    # The first dataset goes: its images stay, the second uses them; with the second, they go.
    assert stack.client.delete(f"/v1/datasets/{ids[0]}", headers=B).status_code == 200
    assert not (stack.data_dir / "datasets" / ids[0]).exists()
    assert all(_image(stack, ref).is_file() for ref in refs)
    assert stack.client.delete(f"/v1/datasets/{ids[1]}", headers=B).status_code == 200
    assert not any(_image(stack, ref).exists() for ref in refs - shared)
    assert all(_image(stack, ref).is_file() for ref in refs & shared)


def test_a_datasets_images_count_towards_its_keys_storage(stack: Stack) -> None:
    from app.admission import storage_of
    from core.store import ArtifactStore

    dataset_id = stack.datasets[KEY_A]
    store = ArtifactStore(stack.data_dir)
    owner = records.owner_of(KEY_A)
    refs = _refs(stack, dataset_id)
    images_bytes = sum(_image(stack, ref).stat().st_size for ref in refs)
    dataset_bytes = sum(p.stat().st_size for p in (stack.data_dir / "datasets" / dataset_id).rglob("*") if p.is_file())
    assert images_bytes > 0
    assert storage_of(stack.conn, store, owner) >= images_bytes + dataset_bytes
