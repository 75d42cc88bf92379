"""Auth and the one error envelope: every failure a client can see has the same shape."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from cli.services import free_port
from core.settings import Settings
from tests.app.conftest import AUTH_A


def assert_envelope(response, status: int, type: str, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"type", "code", "message", "param"}
    assert error["type"] == type
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    assert error["param"] == param
    return error


@pytest.mark.parametrize("path", ["/v1/datasets", "/v1/pairsets", "/v1/datasets/ds_x", "/v1/pairsets/ps_x/events"])
def test_no_key_is_401(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert_envelope(r, 401, "authentication_error", "missing_api_key", "Authorization")
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "header", ["Bearer wrong-key", "Basic a2V5LWFsaWNlLTAxMjM0NTY3ODk=", "Bearer", "key-alice-0123456789"]
)
def test_wrong_key_is_401(client: TestClient, header: str) -> None:
    r = client.get("/v1/datasets", headers={"Authorization": header})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"


def test_no_key_is_401_even_with_an_invalid_body(client: TestClient) -> None:
    r = client.post("/v1/pairsets", json={"colour": "red"})
    assert r.status_code == 401


def test_no_key_is_401_before_any_upload_is_stored(client: TestClient, settings: Settings) -> None:
    r = client.post("/v1/datasets", files={"file": ("d.zip", b"x" * 1000)})
    assert r.status_code == 401
    assert not (settings.data_dir / "uploads").exists()


def test_empty_key_list_refuses_everyone(settings: Settings, redis_client) -> None:
    with TestClient(create_app(settings.model_copy(update={"api_keys": []}))) as c:
        assert c.get("/v1/datasets", headers=AUTH_A).status_code == 401


def test_unknown_route_is_404_envelope(client: TestClient) -> None:
    assert_envelope(client.get("/v2/nothing", headers=AUTH_A), 404, "not_found_error", "route_not_found")


def test_wrong_method_is_405_envelope(client: TestClient) -> None:
    r = client.put("/v1/datasets", headers=AUTH_A)
    assert_envelope(r, 405, "invalid_request_error", "method_not_allowed")
    assert r.headers["allow"]


def test_validation_error_is_422_envelope_with_param(client: TestClient) -> None:
    r = client.get("/v1/datasets?limit=0", headers=AUTH_A)
    assert_envelope(r, 422, "invalid_request_error", "greater_than_equal", "limit")
    r = client.post("/v1/pairsets", headers=AUTH_A, json={"dataset_id": "ds_x", "generation": {"top_p": 2}})
    assert_envelope(r, 422, "invalid_request_error", "less_than_equal", "generation.top_p")


def test_invalid_json_is_422_envelope(client: TestClient) -> None:
    r = client.post("/v1/pairsets", headers={**AUTH_A, "Content-Type": "application/json"}, content=b"{not json")
    assert_envelope(r, 422, "invalid_request_error", "invalid_json")


def test_unexpected_error_is_500_envelope_and_logged(settings: Settings, redis_client, caplog) -> None:
    app = create_app(settings)

    def boom() -> None:
        raise RuntimeError("secret detail")

    app.add_api_route("/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom")
    error = assert_envelope(r, 500, "server_error", "internal_error")
    assert "secret" not in error["message"]
    assert "secret detail" in caplog.text


def test_redis_down_is_503_envelope(settings: Settings, tmp_path) -> None:
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_app(down)) as c:
        assert_envelope(c.get("/v1/datasets", headers=AUTH_A), 503, "transient_error", "redis_unavailable")
        assert_envelope(c.get("/readyz"), 503, "transient_error", "redis_unavailable")
        assert c.get("/healthz").json() == {"status": "ok"}
