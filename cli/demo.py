"""`miadpo demo`: the main job end to end over the HTTP API, on the bundled sample data.

Starts the embedded stack (its own redis-server, the API, a worker and a trainer, logs in a file) unless
given `--url`, writes the synthetic shapes data (`single` style) twice, a training dataset and a held-out
one (another seed), uploads both, makes a pair set with the built-in trained `shapes-llava` that trains
when its pairs are done and then evaluates the base model and the adapter on the held-out prompts, shows
progress bars, downloads the adapter and ends with the base vs adapter accuracies side by side.
"""

from __future__ import annotations

import copy
import os
import secrets
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cli.services import free_port
from core.client import Client
from core.errors import FatalError

# Small enough for a 2-core laptop in a few minutes, large enough that every format shows up.
DEMO_SAMPLES = 48  # images of the training dataset and of the held-out one
PAIRSET_REQUEST: dict[str, Any] = {
    "model": "shapes-llava",
    "augmentation": {"num": 64},
    "generation": {"max_new_tokens": 12, "batch_size": 16},
    "shard_size": 32,
    "seed": 0,
    "train": {
        "hyperparameters": {"lora_r": 16, "lora_alpha": 32, "learning_rate": 2e-4, "num_epochs": 2, "per_device_batch_size": 8},
        "checkpoint_every": 100,
        # filled in with the held-out dataset's id
        "evaluation": {"num": 40, "max_new_tokens": 12, "batch_size": 16, "seed": 0},
    },
}


def start_stack(data_dir: Path, console: Console) -> tuple[subprocess.Popen, str, str]:
    """`miadpo up` in the background with its own Redis; returns (process, url, api key)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port, key = free_port(), secrets.token_urlsafe(18)
    # A Redis URL nobody answers on (MIADPO_REDIS_URL would win over it, so it goes): `up` then starts a
    # redis-server of its own under the data dir, and the demo never touches another Redis's data.
    env = {k: v for k, v in os.environ.items() if k != "MIADPO_REDIS_URL"}
    env.update(MIADPO_DATA_DIR=str(data_dir.resolve()), MIADPO_API_KEYS=key, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    log = open(data_dir / "stack.log", "ab")  # noqa: SIM115 (closed with the process by the OS)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "up", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    with console.status("starting the stack (redis, api, worker, trainer)..."):
        while True:
            if proc.poll() is not None:
                raise FatalError(f"the stack exited with {proc.returncode}; see {data_dir / 'stack.log'}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                stop_stack(proc)
                raise FatalError(f"the stack did not become ready in 180 s; see {data_dir / 'stack.log'}")
            time.sleep(0.5)
    console.print(f"stack up at {url} (logs: {data_dir / 'stack.log'})")
    return proc, url, key


def stop_stack(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def demo_request(model: str | None = None, num: int | None = None, max_steps: int | None = None) -> dict[str, Any]:
    """The demo's pair-set request, with its model, prompt count and training length changed where given."""
    request = copy.deepcopy(PAIRSET_REQUEST)
    if model is not None:
        request["model"] = model
    if num is not None:
        request["augmentation"]["num"] = num
    if max_steps is not None:
        request["train"]["hyperparameters"]["max_steps"] = max_steps
    return request


def run_demo(
    out: Path, url: str | None = None, api_key: str | None = None, *, request: dict[str, Any] | None = None
) -> int:
    """Run the demo (the pair-set request `demo_request()` unless given); return the exit code."""
    from workers.sample_data import write_sample_data

    console = Console()
    started = time.monotonic()
    proc = None
    if url is None:
        proc, url, api_key = start_stack(out / "stack", console)
    elif not api_key:
        raise FatalError("--url needs --api-key")
    try:
        with Client(url, api_key or "") as client:
            return _demo(client, out, console, write_sample_data, started, request or demo_request())
    finally:
        if proc is not None:
            with console.status("stopping the stack..."):
                stop_stack(proc)


def _upload(client: Client, console: Console, folder: Path, name: str) -> dict[str, Any] | None:
    dataset = client.upload_dataset(folder, name=name)
    with console.status(f"validating the dataset {name!r}..."):
        dataset = client.wait_dataset(dataset["id"])
    if dataset["status"] != "ready":
        console.print(f"[red]dataset failed:[/red] {dataset['error']}")
        return None
    console.print(f"dataset {dataset['id']} ({name}): {dataset['num_samples']} samples, {dataset['num_images']} images, {dataset['num_problems']} problems")
    return dataset


def _demo(client: Client, out: Path, console: Console, write_sample_data: Any, started: float, request: dict[str, Any]) -> int:
    # Two draws of the generator: pairs are made on one, the evaluation asks the other (held out).
    train_dir = write_sample_data(out / "sample-data", num_samples=DEMO_SAMPLES, seed=0, style="single").parent
    heldout_dir = write_sample_data(out / "heldout-data", num_samples=DEMO_SAMPLES, seed=1, style="single").parent
    dataset = _upload(client, console, train_dir, "shapes (sample data)")
    heldout = _upload(client, console, heldout_dir, "shapes (held out)")
    if dataset is None or heldout is None:
        return 1

    request = copy.deepcopy(request)
    request["train"]["evaluation"]["dataset_id"] = heldout["id"]
    pairset = client.create_pairset(dataset_id=dataset["id"], **request)
    columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("pairs", total=request["augmentation"]["num"], info="queued")

        def show_pairs(record: dict) -> None:
            progress.update(task, completed=record["progress"]["done"], total=record["progress"]["total"] or None, info=record["stage"] or record["status"])

        pairset = client.wait_pairset(pairset["id"], on_update=show_pairs)
        progress.update(task, info=pairset["status"])
        if pairset["status"] != "succeeded" or not pairset.get("training_id"):
            console.print(f"[red]pair set {pairset['status']}:[/red] {pairset['error']}")
            return 1
        train_task = progress.add_task("training", total=None, info="queued")

        def show_training(record: dict) -> None:
            metrics = record.get("metrics") or {}
            info = record["status"]
            if "loss" in metrics:
                info = f"loss {metrics['loss']:.3f}  reward acc {metrics.get('rewards/accuracies', float('nan')):.2f}"
            p = record["progress"]
            progress.update(train_task, completed=p["step"], total=p["total_steps"] or None, info=info)

        training = client.wait_training(pairset["training_id"], on_update=show_training)
        if training["status"] != "succeeded":
            console.print(f"[red]training {training['status']}:[/red] {training['error']}")
            return 1
        eval_task = progress.add_task("evaluation", total=2, info="base model and adapter")
        training = _wait_evaluation(client, training["id"], lambda n: progress.update(eval_task, completed=n))

    archive = client.download(f"/v1/trainings/{training['id']}/adapter", out / "adapter.tar.gz")
    adapter_dir = out / "adapter"
    with tarfile.open(archive) as tar:
        tar.extractall(adapter_dir, filter="data")
    per_format = _pairs_per_format(client, pairset["id"])
    counts = pairset["counts"]
    removed = counts["removed"]
    console.print()
    console.print(f"[bold]pair set {pairset['id']}[/bold]: {counts['prompts']} prompts, {counts['hallucinated']} with a hallucinated answer, {counts['pairs']} pairs")
    console.print("  pairs per format: " + ", ".join(f"{f} {n}" for f, n in sorted(per_format.items())))
    console.print(f"  removed by post-selection: perplexity {removed['perplexity']}, length ratio {removed['length_ratio']}, edit distance {removed['edit_distance']}")
    metrics = training["metrics"]
    console.print(f"[bold]training {training['id']}[/bold]: {training['progress']['step']} steps, final reward accuracy {metrics.get('rewards/accuracies', float('nan')):.2f}, loss {metrics.get('loss', float('nan')):.3f}")
    console.print(f"  adapter: {adapter_dir.resolve()} (load it with peft.PeftModel.from_pretrained)")
    evaluation = training.get("evaluation") or {}
    entries = [evaluation.get(k) or {} for k in ("base", "adapter")]
    if not all(e.get("status") == "succeeded" for e in entries):
        console.print(f"[red]evaluation did not succeed:[/red] base {entries[0].get('status')}, adapter {entries[1].get('status')}")
        return 1
    console.print()
    for line in accuracy_table(entries[0]["result"], entries[1]["result"], evaluation["request"]["num"]):
        console.print(line)
    console.print(f"done in {time.monotonic() - started:.0f} s")
    return 0


def _wait_evaluation(client: Client, training_id: str, on_done: Any, timeout_s: float = 1800) -> dict[str, Any]:
    """The training once both of its evaluations (base model, adapter) have ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        training = client.get(f"/v1/trainings/{training_id}")
        evaluation = training.get("evaluation") or {}
        entries = [evaluation.get(k) for k in ("base", "adapter")]
        ended = [e for e in entries if e and e["status"] in ("succeeded", "failed", "cancelled")]
        on_done(len(ended))
        if len(ended) == 2 or time.monotonic() > deadline:
            return training
        time.sleep(0.5)


def accuracy_table(base: dict[str, Any], adapter: dict[str, Any], num: int) -> list[str]:
    """Base model vs adapter, side by side: single-image, each format, the average over formats, confusion."""

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f} %"

    rows = [("single-image", base["single_image"]["accuracy"], adapter["single_image"]["accuracy"])]
    for fmt, entry in base["multi_image"]["per_format"].items():
        rows.append((fmt, entry["accuracy"], adapter["multi_image"]["per_format"].get(fmt, {}).get("accuracy")))
    rows.append(("multi-image (avg)", base["multi_image"]["format_average"], adapter["multi_image"]["format_average"]))
    rows.append(("confused image", base["multi_image"]["confused_rate"], adapter["multi_image"]["confused_rate"]))
    lines = [f"held-out accuracy ({num} multi-image prompts and their samples alone)", f"{'':<20}{'base':>10}{'adapter':>10}"]
    lines += [f"{name:<20}{pct(b):>10}{pct(a):>10}" for name, b, a in rows]
    return lines


def _pairs_per_format(client: Client, pairset_id: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    after = None
    while True:
        page = client.get(f"/v1/pairsets/{pairset_id}/pairs", limit=100, **({"after": after} if after else {}))
        counts.update(p["format"] for p in page["data"])
        if not page["has_more"] or not page["data"]:
            return counts
        after = page["data"][-1]["uid"]
