"""The app in-process (TestClient) against the session's real redis-server, emptied per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from app.main import create_app
from core.settings import Settings

KEY_A = "key-alice-0123456789"
KEY_B = "key-bob-0123456789"
AUTH_A = {"Authorization": f"Bearer {KEY_A}"}
AUTH_B = {"Authorization": f"Bearer {KEY_B}"}


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        redis_url=redis_url,
        api_keys=[KEY_A, KEY_B],
        max_upload_bytes=64 * 1024,
        generation_endpoints={"vllm": "http://127.0.0.1:9/v1"},  # named, never called by these tests
        # Jobs never run here: the running-jobs quotas would count every record made (tests/e2e test them).
        max_running_pairsets_per_key=0,
        max_running_trainings_per_key=0,
    )


@pytest.fixture
def client(settings: Settings, redis_client: Redis) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c
