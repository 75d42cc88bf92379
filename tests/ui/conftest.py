"""One real stack for the viewer's tests (redis-server, `miadpo api`, `miadpo worker --queues cpu,gpu` as
processes, tiny-llava on CPU, a finished pair set) and a headless Chromium from Debian's packages.

The browser is driven by Selenium through the system `chromedriver`: nothing downloads a browser (Selenium
Manager is switched off). A machine without the packages fails these tests with the command that installs
them, rather than skipping them: a skipped browser test is a viewer nobody checked.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

from core.client import zip_folder
from core.process import free_port
from tests.e2e.conftest import Service, redis_db, service_env, wait_for
from workers.sample_data import write_sample_data

KEY = "viewer-key-a"
OTHER_KEY = "viewer-key-b"
# Every format, so the browser can filter to grid prompts; short answers keep generation quick.
PAIRSET = {
    "augmentation": {"num": 16, "mix": {"formats": {"sequence": 1, "grid": 2, "pic_in_pic": 1}}},
    "generation": {"max_new_tokens": 8, "batch_size": 8},
    "shard_size": 8,
    "seed": 3,
}


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Stack:
    url: str
    client: httpx.Client
    conn: Redis
    data_dir: Path
    env: dict[str, str]
    root: Path
    started: list[Service] = field(default_factory=list)
    dataset_id: str = ""
    pairset_id: str = ""

    def start(self, args: list[str], **extra: str) -> Service:
        service = Service(args, {**self.env, **extra}, self.root / f"{args[0]}-{len(self.started)}.log")
        self.started.append(service)
        return service

    def get(self, path: str, key: str = KEY, **params: Any) -> dict[str, Any]:
        r = self.client.get(path, headers=auth(key), params=params)
        assert r.status_code == 200, r.text
        return r.json()

    def stop(self) -> None:
        self.client.close()
        for service in reversed(self.started):
            service.stop()
            print(f"----- {' '.join(service.proc.args[3:])} -----\n{service.output()[-3000:]}")


def start_stack(
    root: Path, redis_url: str, *, trainer: bool = False, pairset: Callable[[str], dict[str, Any]] | None = None
) -> Stack:
    """API and worker processes on `redis_url`, a dataset uploaded with KEY and a pair set made from it
    (finished when this returns); with `trainer`, a trainer process too. `pairset(dataset_id)` gives the
    pair set's request (default: PAIRSET on that dataset)."""
    conn = Redis.from_url(redis_url)
    conn.flushdb()
    env = service_env(root / "data", redis_url, MIADPO_API_KEYS=f"{KEY},{OTHER_KEY}", MIADPO_DEVICE="cpu", MIADPO_JOB_RETRY_INTERVALS="0")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stack = Stack(url, httpx.Client(base_url=url, timeout=60), conn, root / "data", env, root)
    try:
        stack.start(["api", "--port", str(port)])
        stack.start(["worker", "--queues", "cpu,gpu"])
        if trainer:
            stack.start(["trainer"])
        wait_for(lambda: stack.client.get("/readyz").status_code == 200, 60, "the API to be ready")
        write_sample_data(root / "sample", num_samples=12, seed=0)
        r = stack.client.post("/v1/datasets", headers=auth(), files={"file": ("shapes.zip", zip_folder(root / "sample"))}, data={"name": "shapes"})
        assert r.status_code == 201, r.text
        stack.dataset_id = r.json()["id"]
        wait_for(lambda: stack.get(f"/v1/datasets/{stack.dataset_id}")["status"] == "ready", 60, "ingest")
        body = pairset(stack.dataset_id) if pairset else {"dataset_id": stack.dataset_id, **PAIRSET}
        r = stack.client.post("/v1/pairsets", headers=auth(), json=body)
        assert r.status_code == 201, r.text
        stack.pairset_id = r.json()["id"]

        def finished() -> bool:
            status = stack.get(f"/v1/pairsets/{stack.pairset_id}")["status"]
            assert status in ("queued", "running", "succeeded"), status
            return status == "succeeded"

        wait_for(finished, 300, "the pair set to succeed", interval=0.3)
    except BaseException:
        stack.stop()
        raise
    return stack


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("viewer"), redis_db(redis_url, 12))
    yield stack
    stack.stop()


def make_driver(chromium: str, chromedriver: str, width: int = 1280, height: int = 900) -> Any:
    """Headless Debian Chromium through the system chromedriver (`browser_executables` finds them, or fails
    the test with the command that installs them)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a browser or a driver
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=DriverService(chromedriver), options=options)


@pytest.fixture(scope="package")
def driver(browser_executables: tuple[str, str]) -> Iterator[Any]:
    d = make_driver(*browser_executables)
    d.implicitly_wait(0)
    yield d
    d.quit()
