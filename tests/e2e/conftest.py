"""Real processes for the end-to-end tests: `miadpo api` / `worker` / `up` as subprocesses."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def redis_db(url: str, db: int) -> str:
    """The same server, another database: e2e tests never share data with the in-process tests."""
    return url.rsplit("/", 1)[0] + f"/{db}"


def service_env(data_dir: Path, redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIADPO_") and k != "REDIS_URL"}
    # Running-job quotas off: these stacks run several pair sets and trainings of one key on purpose
    # (test_tenancy_e2e.py sets its own).
    quotas = {"MIADPO_MAX_RUNNING_PAIRSETS_PER_KEY": "0", "MIADPO_MAX_RUNNING_TRAININGS_PER_KEY": "0"}
    env.update(MIADPO_DATA_DIR=str(data_dir), REDIS_URL=redis_url, MIADPO_REDIS_URL=redis_url, **{**quotas, **extra})
    return env


class Service:
    """A `python -m cli ...` subprocess in its own process group, its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", *args],
            env=env,
            cwd=ROOT,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        self.kill(signal.SIGKILL)  # whatever is left of the group
        self.proc.wait()
        self._fh.close()
        return self.proc.returncode


def wait_for(check: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> object:
    """Poll `check` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.TransportError):
            result = check()
            if result:
                return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """start(args, env) -> Service; everything started is stopped at the end (logs shown on failure)."""
    started: list[Service] = []

    def start(args: list[str], env: dict[str, str]) -> Service:
        service = Service(args, env, tmp_path / f"{args[0]}-{len(started)}.log")
        started.append(service)
        return service

    yield start
    for service in reversed(started):
        service.stop()
        print(f"----- {' '.join(service.proc.args[3:])} -----\n{service.output()[-4000:]}")
