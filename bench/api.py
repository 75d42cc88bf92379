"""Benchmark: the HTTP service under a bounded load (run: python bench/api.py, or `make bench-api`).

Starts redis-server, `miadpo api` and, when the pipeline runs, a cpu and a gpu worker, all as subprocesses
on loopback, with the tiny model on the sample data. A separate load process (so the client's own work is
not the server's) drives a fixed number of requests with a fixed number of concurrent clients:

1. pair-set creation: latency p50/p99 of `POST /v1/pairsets` on a ready dataset (no worker runs yet,
   so only the API and Redis are measured);
2. status polls: requests/s of `GET /v1/pairsets/{id}` over the pair sets just made;
3. cancel: latency p50/p99 of `POST /v1/pairsets/{id}/cancel` (which also drops their queued jobs);
4. overhead: one pair set from create to succeeded through the service (one gpu worker) against
   `miadpo pairs` in one process on the same data, same config and seed.

Everything is bounded in count and time (< 2 minutes on 2 busy cores) and cleaned up at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
from redis import Redis
from rq import Worker

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli.services import free_port, start_redis  # noqa: E402
from core.runtime import configure_libraries  # noqa: E402

KEY = "bench-api-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TERMINAL = ("succeeded", "failed", "cancelled")
PIPELINE = {"num": 24, "max_new_tokens": 8, "shard_size": 8, "batch_size": 4, "seed": 0}


def _request(config: dict[str, int], dataset_id: str) -> dict[str, Any]:
    return {
        "dataset_id": dataset_id,
        "augmentation": {"num": config["num"]},
        "generation": {"max_new_tokens": config["max_new_tokens"], "batch_size": config["batch_size"]},
        "shard_size": config["shard_size"],
        "seed": config["seed"],
    }


# --------------------------------------------------------------------------------------------------
# The load process


async def _timed(client: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = await client.request(method, url, **kwargs)
    return time.perf_counter() - started, response


async def _drive(base_url: str, dataset_id: str, creates: int, polls: int, concurrency: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=30, limits=limits) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one(method: str, url: str, **kwargs: Any) -> tuple[float, httpx.Response]:
            async with sem:
                return await _timed(client, method, url, **kwargs)

        body = _request(PIPELINE, dataset_id)
        started = time.perf_counter()
        made = await asyncio.gather(*(one("POST", "/v1/pairsets", json=body) for _ in range(creates)))
        create_wall = time.perf_counter() - started
        assert all(r.status_code == 201 for _, r in made), {r.status_code for _, r in made}
        ids = [r.json()["id"] for _, r in made]

        started = time.perf_counter()
        polled = await asyncio.gather(*(one("GET", f"/v1/pairsets/{ids[i % len(ids)]}") for i in range(polls)))
        poll_wall = time.perf_counter() - started
        assert all(r.status_code == 200 for _, r in polled)

        started = time.perf_counter()
        cancelled = await asyncio.gather(*(one("POST", f"/v1/pairsets/{i}/cancel") for i in ids))
        cancel_wall = time.perf_counter() - started
        assert all(r.status_code == 200 and r.json()["status"] == "cancelled" for _, r in cancelled)
    return {
        "create": ([t for t, _ in made], create_wall),
        "poll": ([t for t, _ in polled], poll_wall),
        "cancel": ([t for t, _ in cancelled], cancel_wall),
    }


def _load_process(base_url: str, dataset_id: str, creates: int, polls: int, concurrency: int, out: Any) -> None:
    out.put(asyncio.run(_drive(base_url, dataset_id, creates, polls, concurrency)))


# --------------------------------------------------------------------------------------------------
# The stack


class Stack:
    """redis-server, the API and workers as subprocesses; everything stopped by `close()`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.redis, self.redis_url = start_redis(root / "data", port=free_port())
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MIADPO_") and k != "REDIS_URL"}
        self.env.update(
            MIADPO_DATA_DIR=str(root / "data"),
            REDIS_URL=self.redis_url,
            MIADPO_REDIS_URL=self.redis_url,
            MIADPO_API_KEYS=KEY,
            MIADPO_LOG_LEVEL="WARNING",
            MIADPO_DEVICE="cpu",  # as `miadpo pairs`
            # One key creates many pair sets on purpose: the per-key quotas would refuse them (429).
            MIADPO_MAX_RUNNING_PAIRSETS_PER_KEY="0", MIADPO_MAX_RUNNING_TRAININGS_PER_KEY="0",
        )
        self.procs: list[subprocess.Popen] = []
        self.start("api", "--port", str(self.port))

    def start(self, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{args[0]}-{len(self.procs)}.log", "wb")  # noqa: SIM115 - the process owns it
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", *args], env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def wait(self, client: httpx.Client, path: str, done: Any, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                body = client.get(path, headers=AUTH).json()
                if done(body):
                    return body
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{path} did not finish within {timeout} s (logs in {self.root})")

    def close(self) -> None:
        for proc in [*reversed(self.procs), self.redis]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # the group: a worker's scheduler too
        for proc in [*reversed(self.procs), self.redis]:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _sample_zip(root: Path) -> tuple[Path, bytes]:
    from workers.sample_data import write_sample_data

    folder = root / "sample"
    write_sample_data(folder, num_samples=12, seed=0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
    return folder, buf.getvalue()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _warm_up(root: Path) -> None:
    """Import the pipeline in this process and build the tiny model in the store once, before any clock."""
    os.environ["MIADPO_DATA_DIR"] = str(root / "data")  # before anything here reads the settings
    from workers.models import load_model

    load_model("tiny-llava")


def _miadpo_pairs(root: Path, dataset: Path) -> float:
    """`miadpo pairs` in this process (the pipeline steps in one process), same data, config and seed."""
    from cli.main import main as cli

    args = ["pairs", "--dataset", str(dataset), "--out", str(root / "pairs"), "--num", str(PIPELINE["num"])]
    args += ["--max-new-tokens", str(PIPELINE["max_new_tokens"]), "--batch-size", str(PIPELINE["batch_size"])]
    args += ["--shard-size", str(PIPELINE["shard_size"]), "--seed", str(PIPELINE["seed"])]
    started = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        stdout, sys.stdout = sys.stdout, devnull
        try:
            assert cli(args) == 0
        finally:
            sys.stdout = stdout
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--creates", type=int, default=200, help="Pair sets created (then polled and cancelled).")
    parser.add_argument("--polls", type=int, default=2000, help="Status requests.")
    parser.add_argument("--concurrency", type=int, default=8, help="Concurrent clients.")
    parser.add_argument("--repeats", type=int, default=3, help="Pipeline runs of each kind (service, one process).")
    args = parser.parse_args()
    configure_libraries()

    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        root = Path(tmp)
        stack = Stack(root)
        try:
            dataset_dir, archive = _sample_zip(root)
            client = httpx.Client(base_url=stack.base_url, timeout=60)
            stack.wait(client, "/readyz", lambda body: body.get("status") == "ready", 30)
            ingest = stack.start("worker", "--queues", "cpu")
            r = client.post("/v1/datasets", headers=AUTH, files={"file": ("sample.zip", archive)})
            dataset_id = r.json()["id"]
            stack.wait(client, f"/v1/datasets/{dataset_id}", lambda body: body["status"] == "ready", 30)
            # The API alone: no worker picks up what the load enqueues.
            os.killpg(ingest.pid, signal.SIGTERM)
            ingest.wait(10)

            out: Any = multiprocessing.get_context("spawn").Queue()
            load = multiprocessing.get_context("spawn").Process(
                target=_load_process, args=(stack.base_url, dataset_id, args.creates, args.polls, args.concurrency, out)
            )
            load.start()
            result = out.get(timeout=90)
            load.join(10)
            for name, what in (
                ("create", "POST /v1/pairsets"),
                ("poll", "GET /v1/pairsets/{id}"),
                ("cancel", "POST /v1/pairsets/{id}/cancel"),
            ):
                times, wall = result[name]
                rows.append((f"{what} latency p50 / p99", f"{_pct(times, 0.5) * 1e3:.1f} / {_pct(times, 0.99) * 1e3:.1f} ms"))
                rows.append((f"{what} throughput", f"{len(times) / wall:.0f} req/s ({len(times)} requests)"))

            # One pair set through the whole service, against the same pipeline in one process; twice each,
            # alternating (the cores are shared: the best run is the least disturbed). Both sides start with
            # their imports done and the tiny model built; each `miadpo pairs` loads the model, the service's
            # gpu worker loads it for its first pair set and keeps it.
            _warm_up(root)
            stack.start("worker", "--queues", "cpu")
            stack.start("worker", "--queues", "gpu")
            # The clock starts once both have registered (their imports are done), as `miadpo pairs` starts warm.
            conn = Redis.from_url(stack.redis_url)
            deadline = time.monotonic() + 60
            while Worker.count(connection=conn) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            service, single = [], []
            for _ in range(args.repeats):
                started = time.perf_counter()
                r = client.post("/v1/pairsets", headers=AUTH, json=_request(PIPELINE, dataset_id))
                ps = stack.wait(client, f"/v1/pairsets/{r.json()['id']}", lambda body: body["status"] in TERMINAL, 120)
                service.append(time.perf_counter() - started)
                assert ps["status"] == "succeeded", ps
                single.append(_miadpo_pairs(root, dataset_dir))  # the workers idle meanwhile
            config = f"num {PIPELINE['num']}, {PIPELINE['max_new_tokens']} new tokens, shards of {PIPELINE['shard_size']}"
            runs = f"best of {args.repeats}: " if args.repeats > 1 else ""
            rows.append(
                (
                    f"service pair set, create -> succeeded ({config})",
                    f"{min(service):.1f} s ({runs}{', '.join(f'{t:.1f}' for t in service)}; {ps['counts']['pairs']} pairs)",
                )
            )
            rows.append(("`miadpo pairs`, one process, same config and seed", f"{min(single):.1f} s ({runs}{', '.join(f'{t:.1f}' for t in single)})"))
            rows.append(("service / one process (best of each)", f"{min(service) / min(single):.2f}x"))
            client.close()
        finally:
            stack.close()

    width = max(len(k) for k, _ in rows)
    print(f"\nmiadpo API benchmark: {args.concurrency} concurrent clients from a separate process, loopback, tiny-llava on CPU")
    print(f"{'measure':<{width}}  value")
    print(f"{'-' * width}  {'-' * 34}")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
