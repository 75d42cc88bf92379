"""Benchmark: one pair set on 1, 2 and 4 gpu workers (run: python bench/scale.py, or `make bench-scale`).

The scale-out story of DESIGN 3.2 and 7, measured: one redis-server (AOF on, as deployed), one artifact
store, `miadpo api`, one cpu worker (start, merge, export) and N `miadpo worker --queues gpu` processes,
each with torch on 1 thread, tiny-llava on CPU. For each N the gpu workers are started fresh, warmed up
(one small pair set, so each has loaded the model, as a long-running worker has), then one pair set is
timed from create to succeeded through the API. Printed: prompts/s, the ratio to one worker, the merge
job's share of the wall time; and, from the one-worker run, what a shard costs the shared parts (Redis
commands, Redis memory kept, bytes read and written by the gpu worker) and what an idle worker costs
Redis. docs/scaling.md turns these into the limits of 100 GPU workers.

On a machine with C cores, N workers of 1 thread each can at best give min(N, C)x; the API, the cpu
worker and Redis share the same cores.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from redis import Redis
from rq import Worker
from rq.job import Job

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli.services import free_port, start_redis  # noqa: E402
from core import jobs, records  # noqa: E402
from core.client import zip_folder  # noqa: E402
from core.runtime import configure_libraries  # noqa: E402

KEY = "bench-scale-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TERMINAL = ("succeeded", "failed", "cancelled")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@dataclass
class Run:
    workers: int
    wall_s: float
    merge_s: float
    shards: int
    prompts: int
    pairs: int
    redis_commands: int  # every client's, during the run, less this script's own polls
    idle_rate: float  # Redis commands/s of the same processes once idle (schedulers, heartbeats, polls)
    redis_memory: int  # used_memory after the run minus before (job results are kept 24 h)
    read_bytes: int  # by the gpu workers (/proc/PID/io rchar: file reads, not sockets)
    written_bytes: int  # by the gpu workers (wchar)
    shard_file_bytes: int  # the shard outputs in the store


class Stack:
    """redis-server, the API, a cpu worker and gpu workers as subprocesses; `close()` stops them all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.redis, self.redis_url = start_redis(root / "data", port=free_port())
        self.conn = Redis.from_url(self.redis_url)
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MIADPO_") and k != "REDIS_URL"}
        self.env.update(
            ONE_THREAD,
            MIADPO_DATA_DIR=str(root / "data"), REDIS_URL=self.redis_url, MIADPO_REDIS_URL=self.redis_url,
            MIADPO_API_KEYS=KEY, MIADPO_LOG_LEVEL="WARNING", MIADPO_DEVICE="cpu",
            # One key's large pair sets on purpose: no per-key quotas.
            MIADPO_MAX_RUNNING_PAIRSETS_PER_KEY="0", MIADPO_MAX_PROMPTS_PER_PAIRSET="0",
        )  # fmt: skip
        self.procs: list[subprocess.Popen] = []
        self.start("api", "--port", str(self.port))
        self.start("worker", "--queues", "cpu")
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers=AUTH, timeout=60)

    def start(self, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{args[0]}-{len(self.procs)}.log", "wb")  # noqa: SIM115 - the process owns it
        proc = subprocess.Popen([sys.executable, "-m", "cli", *args], env=self.env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.procs.append(proc)
        return proc

    def stop(self, procs: list[subprocess.Popen]) -> None:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # the group: a worker's scheduler too
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            self.procs.remove(proc)

    def close(self) -> None:
        self.client.close()
        self.stop(list(reversed(self.procs)))
        self.stop_redis()

    def stop_redis(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.redis.pid, signal.SIGTERM)
        self.redis.wait(10)

    def wait_until(self, check: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if result := check():
                    return result
            time.sleep(0.1)
        raise TimeoutError(f"{what} did not happen within {timeout} s (logs in {self.root})")

    def gpu_workers(self) -> int:
        return sum(1 for w in Worker.all(connection=self.conn) if [q.name for q in w.queues] == ["gpu"])


def _redis_calls(conn: Redis) -> int:
    return sum(int(stats["calls"]) for stats in conn.info("commandstats").values())


def _io(pids: list[int]) -> tuple[int, int]:
    read = written = 0
    for pid in pids:
        fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        read, written = read + int(fields["rchar"]), written + int(fields["wchar"])
    return read, written


def _request(dataset_id: str, num: int, shard_size: int, max_new_tokens: int, batch_size: int, seed: int) -> dict[str, Any]:
    return {
        "dataset_id": dataset_id, "augmentation": {"num": num}, "shard_size": shard_size, "seed": seed,
        "generation": {"max_new_tokens": max_new_tokens, "batch_size": batch_size},
    }  # fmt: skip


def _run_pairset(stack: Stack, body: dict[str, Any]) -> tuple[dict[str, Any], float, int]:
    """Create a pair set through the API, wait for it by reading its record from Redis (one GET a poll);
    returns (the record, create -> succeeded seconds, polls)."""
    started = time.perf_counter()
    r = stack.client.post("/v1/pairsets", json=body)
    r.raise_for_status()
    pairset_id, polls = r.json()["id"], 0
    while True:
        polls += 1
        record = records.find(stack.conn, records.PAIRSET, pairset_id)
        if record is not None and record["status"] in TERMINAL:
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    if record["status"] != "succeeded":
        raise RuntimeError(f"pair set {pairset_id} {record['status']}: {record.get('error')} (logs in {stack.root})")
    return record, elapsed, polls


def measure(stack: Stack, dataset_id: str, workers: int, args: argparse.Namespace) -> Run:
    procs = [stack.start("worker", "--queues", "gpu") for _ in range(workers)]
    try:
        stack.wait_until(lambda: stack.gpu_workers() == workers, 120, f"{workers} gpu workers to register")
        # Warm-up: one shard each, so every worker has loaded the model (blocked workers are served in turn).
        warm, _, _ = _run_pairset(stack, _request(dataset_id, workers * args.shard_size, args.shard_size, 2, args.batch_size, 99))
        names = {Job.fetch(jobs.pairset_shard_job_id(warm["id"], i), connection=stack.conn).worker_name for i in range(workers)}
        if len(names) < workers:
            print(f"  note: the warm-up reached {len(names)} of {workers} workers", file=sys.stderr)
        body = _request(dataset_id, args.num, args.shard_size, args.max_new_tokens, args.batch_size, args.seed)
        calls, memory, io = _redis_calls(stack.conn), stack.conn.info("memory")["used_memory"], _io([p.pid for p in procs])
        record, wall, polls = _run_pairset(stack, body)
        after_io = _io([p.pid for p in procs])
        redis_commands = _redis_calls(stack.conn) - calls - polls - 1  # less our polls and INFO itself
        redis_memory = stack.conn.info("memory")["used_memory"] - memory
        merge = Job.fetch(jobs.pairset_merge_job_id(record["id"]), connection=stack.conn)
        shard_files = (stack.root / "data" / "pairsets" / record["id"] / "shards").glob("*.jsonl")
        # The same processes idle: what they cost Redis anyway (RQ's schedulers tick every second).
        time.sleep(2)
        calls = _redis_calls(stack.conn)
        time.sleep(args.idle_seconds)
        idle_rate = (_redis_calls(stack.conn) - calls - 1) / args.idle_seconds
        return Run(
            workers=workers, wall_s=wall, merge_s=(merge.ended_at - merge.started_at).total_seconds(),
            shards=record["num_shards"], prompts=record["counts"]["prompts"], pairs=record["counts"]["pairs"],
            redis_commands=redis_commands, idle_rate=idle_rate, redis_memory=redis_memory,
            read_bytes=after_io[0] - io[0], written_bytes=after_io[1] - io[1],
            shard_file_bytes=sum(p.stat().st_size for p in shard_files),
        )  # fmt: skip
    finally:
        stack.stop(procs)


def _machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")  # fmt: skip
    import torch

    return f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, torch {torch.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4", help="gpu worker counts to measure, comma list (first = baseline).")
    parser.add_argument("--num", type=int, default=96, help="Prompts in the timed pair set.")
    parser.add_argument("--shard-size", type=int, default=6, help="Prompts per shard.")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="New tokens per answer.")
    parser.add_argument("--batch-size", type=int, default=2, help="Prompts per generation batch.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="How long the idle cost is measured.")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    configure_libraries()

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        root = Path(tmp)
        stack = Stack(root)
        try:
            from workers.sample_data import write_sample_data

            write_sample_data(root / "sample", num_samples=32, seed=0)
            stack.wait_until(lambda: stack.client.get("/readyz").status_code == 200, 60, "the API to be ready")
            r = stack.client.post("/v1/datasets", files={"file": ("sample.zip", zip_folder(root / "sample"))})
            r.raise_for_status()
            dataset_id = r.json()["id"]
            stack.wait_until(lambda: stack.client.get(f"/v1/datasets/{dataset_id}").json()["status"] == "ready", 60, "ingest")
            for n in counts:
                print(f"measuring {n} gpu worker(s) ...", file=sys.stderr, flush=True)
                runs.append(measure(stack, dataset_id, n, args))
            images = [p.stat().st_size for p in (root / "data" / "images").rglob("*") if p.is_file()]
        finally:
            stack.close()

    base = runs[0]
    print(f"\nmiadpo scale-out benchmark: {_machine()}")
    print(f"one pair set of {args.num} prompts in {base.shards} shards of {args.shard_size}, {args.max_new_tokens} new tokens, "
          f"batches of {args.batch_size}; tiny-llava on CPU, torch 1 thread per worker; one Redis (AOF), one store")
    print(f"\n{'gpu workers':>11}  {'wall s':>7}  {'prompts/s':>9}  {'vs 1 worker':>11}  {'merge share':>11}")
    for run in runs:
        rate = run.prompts / run.wall_s
        print(f"{run.workers:>11}  {run.wall_s:>7.1f}  {rate:>9.2f}  {rate / (base.prompts / base.wall_s):>10.2f}x  "
              f"{run.merge_s / run.wall_s:>10.1%}")
    print(f"\nper shard of {args.shard_size} prompts (the {base.workers}-worker run):")
    work = base.redis_commands - base.idle_rate * base.wall_s
    print(f"  Redis commands        {work / base.shards:>10.1f}  (every client's, less what the same processes send idle)")
    print(f"  Redis memory kept     {base.redis_memory / base.shards / 1024:>10.1f} KiB  (finished jobs' results are kept 24 h)")
    mean_image = sum(images) / len(images)
    print(f"  gpu worker reads      {base.read_bytes / base.shards / 1024:>10.1f} KiB  (files; rchar): "
          f"{base.read_bytes / base.prompts / mean_image:.1f} source images per prompt of {mean_image / 1024:.1f} KiB on average")
    print(f"  gpu worker writes     {base.written_bytes / base.shards / 1024:>10.1f} KiB  (files and logs; wchar)")
    print(f"  shard output file     {base.shard_file_bytes / base.shards / 1024:>10.1f} KiB")
    last = runs[-1]
    idle = f"idle: {base.idle_rate:.1f} Redis commands/s with {base.workers} gpu + 1 cpu worker"
    if last.workers != base.workers:
        extra = (last.idle_rate - base.idle_rate) / (last.workers - base.workers)
        idle += f", {last.idle_rate:.1f} with {last.workers} gpu + 1 cpu: {extra:.2f}/s per extra worker"
    print(f"{idle} (the rest: the one RQ scheduler of each queue, every second)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
