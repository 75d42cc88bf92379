"""Datasets over HTTP (in-process app, real Redis): upload, ownership, pagination, idempotency, limits."""

from __future__ import annotations

from fastapi.testclient import TestClient
from redis import Redis
from rq.job import Job

from core import jobs, records
from core.settings import Settings
from tests.app.conftest import AUTH_A, AUTH_B


def upload(client: TestClient, content: bytes = b"PK\x03\x04 not really a zip", headers=AUTH_A, **form) -> dict:
    r = client.post("/v1/datasets", headers=headers, files={"file": ("data.zip", content, "application/zip")}, data=form)
    assert r.status_code == 201, r.text
    return r.json()


def incoming_files(settings: Settings) -> list:
    folder = settings.data_dir / "uploads" / ".incoming"
    return list(folder.iterdir()) if folder.exists() else []


def test_upload_stores_file_records_validating_and_enqueues_ingest(
    client: TestClient, settings: Settings, redis_client: Redis
) -> None:
    ds = upload(client, name="shapes", format="llava")
    assert ds["id"].startswith("ds_") and ds["object"] == "dataset"
    assert (ds["name"], ds["format"], ds["status"]) == ("shapes", "llava", "validating")
    assert ds["problems"] == [] and ds["error"] is None and isinstance(ds["created_at"], int)
    assert set(ds) == {
        "id", "object", "name", "format", "status", "num_rows", "num_samples", "num_images",
        "num_problems", "problems", "error", "created_at",
    }  # fmt: skip
    # The file is under the store, named by us (only the known suffix is kept), nothing left in incoming.
    stored = settings.data_dir / "uploads" / ds["id"] / "upload.zip"
    assert stored.read_bytes() == b"PK\x03\x04 not really a zip"
    assert incoming_files(settings) == []
    job = Job.fetch(jobs.ingest_job_id(ds["id"]), connection=redis_client)
    assert job.origin == "cpu" and job.func_name == "workers.tasks.ingest_dataset" and job.args == (ds["id"],)
    assert job.retries_left == settings.job_retry_max and job.timeout == settings.ingest_timeout_s
    assert job.meta["resource"] == ["dataset", ds["id"]]
    assert client.get(f"/v1/datasets/{ds['id']}", headers=AUTH_A).json() == ds
    # The record knows its owner only by the key's hash.
    raw = redis_client.get(records.record_key("dataset", ds["id"]))
    assert b"key-alice" not in raw


def test_client_file_name_never_reaches_the_disk(client: TestClient, settings: Settings) -> None:
    r = client.post("/v1/datasets", headers=AUTH_A, files={"file": ("../../etc/evil.sh", b"x")})
    ds = r.json()
    assert r.status_code == 201
    assert [p.name for p in (settings.data_dir / "uploads" / ds["id"]).iterdir()] == ["upload"]


def test_another_key_gets_404(client: TestClient) -> None:
    ds = upload(client)
    for method, path in (("GET", f"/v1/datasets/{ds['id']}"), ("DELETE", f"/v1/datasets/{ds['id']}")):
        r = client.request(method, path, headers=AUTH_B)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "dataset_not_found"
    assert client.get("/v1/datasets", headers=AUTH_B).json()["data"] == []
    assert client.get(f"/v1/datasets/{ds['id']}", headers=AUTH_A).status_code == 200


def test_list_pagination_newest_first(client: TestClient) -> None:
    ids = [upload(client, name=f"d{i}")["id"] for i in range(5)]
    assert ids == sorted(ids)  # ids sort in creation order, even within one millisecond
    upload(client, headers=AUTH_B)
    page1 = client.get("/v1/datasets?limit=2", headers=AUTH_A).json()
    assert page1["object"] == "list" and page1["has_more"] is True
    assert [d["id"] for d in page1["data"]] == ids[::-1][:2]
    page2 = client.get(f"/v1/datasets?limit=2&after={page1['data'][-1]['id']}", headers=AUTH_A).json()
    assert [d["id"] for d in page2["data"]] == ids[::-1][2:4] and page2["has_more"] is True
    page3 = client.get(f"/v1/datasets?limit=2&after={page2['data'][-1]['id']}", headers=AUTH_A).json()
    assert [d["id"] for d in page3["data"]] == ids[:1] and page3["has_more"] is False
    everything = client.get("/v1/datasets", headers=AUTH_A).json()
    assert [d["id"] for d in everything["data"]] == ids[::-1] and everything["has_more"] is False
    # A cursor that was deleted in the meantime still works.
    client.delete(f"/v1/datasets/{ids[3]}", headers=AUTH_A)
    after_deleted = client.get(f"/v1/datasets?limit=1&after={ids[3]}", headers=AUTH_A).json()
    assert [d["id"] for d in after_deleted["data"]] == [ids[2]]
    for bad in ("limit=101", "limit=0", "after=not-an-id"):
        assert client.get(f"/v1/datasets?{bad}", headers=AUTH_A).status_code == 422


def test_idempotency_key_returns_the_first_result(client: TestClient, settings: Settings, redis_client: Redis) -> None:
    headers = {**AUTH_A, "Idempotency-Key": "upload-1"}
    first = upload(client, headers=headers, name="a")
    r = client.post("/v1/datasets", headers=headers, files={"file": ("data.zip", b"PK\x03\x04 not really a zip")}, data={"name": "a"})
    assert r.status_code == 201 and r.json() == first
    assert r.headers["idempotent-replayed"] == "true"
    assert client.get("/v1/datasets", headers=AUTH_A).json()["data"] == [first]
    assert redis_client.llen("rq:queue:cpu") == 1
    assert incoming_files(settings) == []
    # Same key, different request: 409. The key is per API key: another key may use the same string.
    r = client.post("/v1/datasets", headers=headers, files={"file": ("data.zip", b"other bytes")}, data={"name": "a"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused"
    assert r.json()["error"]["param"] == "Idempotency-Key"
    other = upload(client, headers={**AUTH_B, "Idempotency-Key": "upload-1"}, name="a")
    assert other["id"] != first["id"]
    # Without a key every call creates.
    assert upload(client)["id"] != upload(client)["id"]


def test_upload_over_the_limit_is_413_and_leaves_nothing(client: TestClient, settings: Settings) -> None:
    big = b"x" * (settings.max_upload_bytes + 1)
    r = client.post("/v1/datasets", headers=AUTH_A, files={"file": ("big.zip", big)})
    assert r.status_code == 413
    assert r.json()["error"] == {
        "type": "invalid_request_error",
        "code": "upload_too_large",
        "message": f"upload is larger than {settings.max_upload_bytes} bytes",
        "param": "file",
    }
    assert incoming_files(settings) == []
    assert client.get("/v1/datasets", headers=AUTH_A).json()["data"] == []
    # Exactly at the limit is fine.
    upload(client, content=b"x" * settings.max_upload_bytes)


def test_upload_over_the_limit_is_refused_while_streaming(client: TestClient, settings: Settings) -> None:
    """No Content-Length (a chunked upload): the limit is enforced on the bytes as they arrive."""
    boundary = "b0undary"
    chunk = b"y" * 8192

    def body():
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.zip"\r\n\r\n'.encode()
        for _ in range(settings.max_upload_bytes // len(chunk) + 2):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post(
        "/v1/datasets",
        headers={**AUTH_A, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=body(),
    )
    assert r.status_code == 413
    assert incoming_files(settings) == []


def test_upload_validation(client: TestClient, settings: Settings) -> None:
    r = client.post("/v1/datasets", headers=AUTH_A, files={"file": ("d.zip", b"x")}, data={"format": "csv"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "format"
    r = client.post("/v1/datasets", headers=AUTH_A, files={"file": ("d.zip", b"x")}, data={"colour": "red"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "colour"
    assert r.json()["error"]["code"] == "extra_forbidden"
    r = client.post("/v1/datasets", headers=AUTH_A, files={"other": ("d.zip", b"x")})
    assert r.status_code == 422 and r.json()["error"]["param"] == "file"
    for not_multipart in ({"data": {"name": "x"}}, {"json": {"file": "x"}}):
        r = client.post("/v1/datasets", headers=AUTH_A, **not_multipart)
        assert r.status_code == 400 and r.json()["error"]["code"] == "multipart_required"
    assert incoming_files(settings) == []
    assert not (settings.data_dir / "uploads").exists() or [
        p.name for p in (settings.data_dir / "uploads").iterdir()
    ] == [".incoming"]


def test_delete_removes_record_files_and_queued_job(client: TestClient, settings: Settings, redis_client: Redis) -> None:
    ds = upload(client)
    (settings.data_dir / "datasets" / ds["id"]).mkdir(parents=True)
    r = client.delete(f"/v1/datasets/{ds['id']}", headers=AUTH_A)
    assert r.status_code == 200 and r.json() == {"id": ds["id"], "object": "dataset", "deleted": True}
    assert client.get(f"/v1/datasets/{ds['id']}", headers=AUTH_A).status_code == 404
    assert not (settings.data_dir / "uploads" / ds["id"]).exists()
    assert not (settings.data_dir / "datasets" / ds["id"]).exists()
    assert Job.fetch(jobs.ingest_job_id(ds["id"]), connection=redis_client).get_status() == "canceled"
    assert redis_client.llen("rq:queue:cpu") == 0
    assert client.delete(f"/v1/datasets/{ds['id']}", headers=AUTH_A).status_code == 404


def test_delete_refused_while_an_unfinished_pairset_uses_it(client: TestClient, redis_client: Redis) -> None:
    ds = upload(client)
    records.set_dataset_ready(redis_client, ds["id"], {"source_format": "llava", "num_rows": 1, "num_samples": 1, "num_images": 1}, max_problems=10)
    ps = client.post("/v1/pairsets", headers=AUTH_A, json={"dataset_id": ds["id"]}).json()
    r = client.delete(f"/v1/datasets/{ds['id']}", headers=AUTH_A)
    assert r.status_code == 409 and r.json()["error"]["code"] == "dataset_in_use"
    client.post(f"/v1/pairsets/{ps['id']}/cancel", headers=AUTH_A)
    assert client.delete(f"/v1/datasets/{ds['id']}", headers=AUTH_A).status_code == 200


def test_ready_dataset_shows_counts_and_capped_problems(client: TestClient, redis_client: Redis, settings: Settings) -> None:
    ds = upload(client)
    problems = [{"row": i, "id": str(i), "code": "empty_answer", "reason": "no answer"} for i in range(150)]
    manifest = {"source_format": "jsonl", "num_rows": 200, "num_samples": 50, "num_images": 40, "problems": problems}
    records.set_dataset_ready(redis_client, ds["id"], manifest, max_problems=settings.max_problems_listed)
    got = client.get(f"/v1/datasets/{ds['id']}", headers=AUTH_A).json()
    assert (got["status"], got["format"], got["num_rows"], got["num_samples"], got["num_images"]) == ("ready", "jsonl", 200, 50, 40)
    assert got["num_problems"] == 150 and len(got["problems"]) == settings.max_problems_listed
    assert got["problems"][0] == problems[0]


def test_the_storage_quota_refuses_uploads_past_it_and_delete_frees_it(settings: Settings, redis_client: Redis) -> None:
    from app.main import create_app

    with TestClient(create_app(settings.model_copy(update={"max_storage_bytes_per_key": 3000}))) as c:
        first = upload(c, b"x" * 2000)
        r = c.post("/v1/datasets", headers=AUTH_A, files={"file": ("d.zip", b"y" * 2000)})
        assert r.status_code == 429, r.text
        assert (r.json()["error"]["type"], r.json()["error"]["code"]) == ("quota_error", "storage_quota_exceeded")
        assert upload(c, b"y" * 2000, headers=AUTH_B)["status"] == "validating"  # another key's quota
        assert not any((settings.data_dir / "uploads" / ".incoming").iterdir())  # the refused upload is gone
        assert c.delete(f"/v1/datasets/{first['id']}", headers=AUTH_A).status_code == 200
        assert upload(c, b"y" * 2000)["status"] == "validating"
