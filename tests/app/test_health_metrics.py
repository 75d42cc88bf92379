"""/healthz, /readyz and /metrics."""

from __future__ import annotations

import re
import shutil

from fastapi.testclient import TestClient

from core.settings import Settings
from tests.app.conftest import AUTH_A


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_readyz_503_when_store_is_not_writable(client: TestClient, settings: Settings) -> None:
    shutil.rmtree(settings.data_dir)
    settings.data_dir.write_text("not a folder")  # unwritable even for root
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "store_unwritable"


def test_metrics_by_route_template_status_and_queue(client: TestClient) -> None:
    client.post("/v1/datasets", headers=AUTH_A, files={"file": ("d.zip", b"PK")})
    client.get("/v1/datasets/ds_missing1", headers=AUTH_A)
    client.get("/v1/datasets/ds_missing2", headers=AUTH_A)
    client.get("/nowhere")
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    # Ids never become labels: both lookups count under the template.
    assert re.search(r'miadpo_http_requests_total\{method="GET",route="/v1/datasets/\{dataset_id\}",status="404"\} 2\.0', text)
    assert re.search(r'miadpo_http_requests_total\{method="POST",route="/v1/datasets",status="201"\} 1\.0', text)
    assert 'route="unmatched",status="404"' in text
    assert "miadpo_http_request_duration_seconds_bucket" in text
    assert 'miadpo_queue_jobs{queue="cpu",state="queued"} 1.0' in text
    assert 'miadpo_queue_jobs{queue="gpu",state="queued"} 0.0' in text
    assert "miadpo_redis_up 1.0" in text
