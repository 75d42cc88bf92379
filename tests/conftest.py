"""Fixtures shared by the whole suite: a real redis-server of our own (never the machine's Redis).

A machine without a program the suite needs fails the tests that need it with the command that installs
it; nothing is skipped, since a skipped test is a part nobody checked (CI installs them all).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from redis import Redis

from cli.services import free_port

# `make test` runs two xdist workers on two cores: one math thread per process (and per service it starts,
# which inherit the environment), or OpenMP threads spin against each other and the suite takes half again longer.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

REDIS_INSTALL = "apt-get install -y redis-server"
BROWSER_INSTALL = "apt-get install -y chromium chromium-driver"


def require_executable(name: str, install: str, path: str | None = None) -> str:
    """The full path of `name` (or of `path`, if given and executable); fails the test with `install` if missing."""
    found = (path if path and os.access(path, os.X_OK) else None) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (not on PATH); install it with: {install}", pytrace=False)
    return found


@pytest.fixture(scope="session")
def browser_executables() -> tuple[str, str]:
    """(chromium, chromedriver) for browser tests: the Debian packages, or the command that installs them."""
    chromium = require_executable("chromium", BROWSER_INSTALL, os.environ.get("MIADPO_CHROMIUM"))
    driver = require_executable("chromedriver", BROWSER_INSTALL, os.environ.get("MIADPO_CHROMEDRIVER"))
    return chromium, driver


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server on a free port with its files in a temp dir, for the whole session."""
    exe = require_executable("redis-server", REDIS_INSTALL)
    folder = tmp_path_factory.mktemp("redis")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)
    client.close()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Redis]:
    """A client on the session's redis-server, emptied before each test."""
    client = Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()
