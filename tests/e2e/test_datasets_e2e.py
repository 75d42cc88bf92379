"""The real stack over HTTP: redis-server, `miadpo api` and `miadpo worker --queues cpu` as processes."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import httpx
import pytest
from redis import Redis

from cli.services import free_port
from core.client import zip_folder
from tests.e2e.conftest import redis_db, service_env, wait_for
from workers.sample_data import write_sample_data

KEY_A, KEY_B = "e2e-key-a", "e2e-key-b"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
NUM_SAMPLES = 12


def sample_zip(folder: Path) -> bytes:
    """The sample dataset plus one row whose image is missing, zipped."""
    json_path = write_sample_data(folder, num_samples=NUM_SAMPLES, seed=0)
    rows = json.loads(json_path.read_text())
    rows.append({"id": "broken", "image": "images/missing.jpg", "conversations": rows[0]["conversations"]})
    json_path.write_text(json.dumps(rows))
    return zip_folder(folder)


def zip_slip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("llava.json", "[]")
        zf.writestr("../../outside.json", "[]")
    return buf.getvalue()


@pytest.fixture
def api(services, tmp_path: Path, redis_url: str) -> httpx.Client:
    url = redis_db(redis_url, 1)
    Redis.from_url(url).flushdb()
    env = service_env(tmp_path / "data", url, MIADPO_API_KEYS=f"{KEY_A},{KEY_B}")
    port = free_port()
    services(["api", "--port", str(port)], env)
    services(["worker", "--queues", "cpu"], env)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    wait_for(lambda: client.get("/readyz").status_code == 200, 30, "the API to be ready")
    return client


def wait_until_done(client: httpx.Client, path: str, pending: str, timeout: float = 30) -> dict:
    def done() -> dict | None:
        body = client.get(path, headers=A).json()
        return body if body["status"] != pending else None

    return wait_for(done, timeout, f"{path} to leave {pending}", interval=0.2)  # type: ignore[return-value]


def test_upload_ingest_ownership_and_a_cancelled_pairset(api: httpx.Client, tmp_path: Path) -> None:
    r = api.post("/v1/datasets", headers=A, files={"file": ("shapes.zip", sample_zip(tmp_path / "sample"))}, data={"name": "shapes"})
    assert r.status_code == 201, r.text
    good = r.json()
    assert good["status"] == "validating"
    r = api.post("/v1/datasets", headers=A, files={"file": ("evil.zip", zip_slip())})
    assert r.status_code == 201, r.text
    evil = r.json()

    ready = wait_until_done(api, f"/v1/datasets/{good['id']}", "validating")
    assert ready["status"] == "ready", ready
    assert (ready["format"], ready["num_rows"], ready["num_samples"], ready["num_images"]) == ("llava", NUM_SAMPLES + 1, NUM_SAMPLES, NUM_SAMPLES)
    assert ready["num_problems"] == 1
    assert ready["problems"] == [
        {"row": NUM_SAMPLES, "id": "broken", "code": "image_not_found", "reason": "image file 'images/missing.jpg' not found"}
    ]

    failed = wait_until_done(api, f"/v1/datasets/{evil['id']}", "validating")
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "unsafe_archive"
    assert "zip slip" in failed["error"]["message"]

    # Another key sees neither.
    for ds in (good, evil):
        r = api.get(f"/v1/datasets/{ds['id']}", headers=B)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert api.get("/v1/datasets", headers=B).json()["data"] == []
    listed = api.get("/v1/datasets", headers=A).json()["data"]
    assert [d["id"] for d in listed] == [evil["id"], good["id"]]

    # A pair set on the ready dataset starts (no gpu worker here: its shards wait) and is cancelled;
    # the event stream follows it to the end over real HTTP.
    r = api.post("/v1/pairsets", headers=A, json={"dataset_id": good["id"], "augmentation": {"num": 10}})
    assert r.status_code == 201, r.text
    ps = r.json()
    assert wait_until_done(api, f"/v1/pairsets/{ps['id']}", "queued")["status"] == "running"
    assert api.post(f"/v1/pairsets/{ps['id']}/cancel", headers=A).json()["status"] == "cancelled"
    with api.stream("GET", f"/v1/pairsets/{ps['id']}/events", headers={**A, "Accept": "text/event-stream"}) as stream:
        text = "".join(stream.iter_text())
    assert "event: created" in text and '"status":"running"' in text and '"status":"cancelled"' in text
    done = api.get(f"/v1/pairsets/{ps['id']}", headers=A).json()
    assert done["status"] == "cancelled" and done["error"] is None
    assert api.get(f"/v1/pairsets/{ps['id']}", headers=B).status_code == 404

    # Deleting the dataset removes its files.
    assert api.delete(f"/v1/datasets/{good['id']}", headers=A).status_code == 200
    assert not (tmp_path / "data" / "datasets" / good["id"]).exists()
    metrics = api.get("/metrics").text
    assert 'miadpo_queue_jobs{queue="cpu",state="finished"} 3.0' in metrics
