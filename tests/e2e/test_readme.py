"""The README's curl examples, run as written against a running stack; each must answer 2xx."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx

from cli.services import free_port
from core.client import zip_folder
from tests.e2e.conftest import ROOT, redis_db, service_env, wait_for
from workers.sample_data import write_sample_data

KEY = "readme-key"
IDS = {"ds_": "DATASET_ID", "ps_": "PAIRSET_ID", "tr_": "TRAINING_ID", "ev_": "EVALUATION_ID"}
FINAL = {"ready", "succeeded", "failed", "cancelled"}


def readme_curl_commands() -> list[str]:
    """Every curl command in the README's bash blocks, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        commands += [line.strip() for line in joined.splitlines() if line.strip().startswith("curl ")]
    return commands


def test_readme_curl_examples_work(services, redis_url, tmp_path: Path) -> None:
    commands = readme_curl_commands()
    assert len(commands) >= 10, "the README lost its API examples"
    port = free_port()
    env = service_env(tmp_path / "data", redis_db(redis_url, 9), MIADPO_API_KEYS=KEY, MIADPO_DEVICE="cpu")
    for args in (["api", "--port", str(port)], ["worker", "--queues", "cpu,gpu"], ["trainer"]):
        services(args, env)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    wait_for(lambda: client.get("/readyz").status_code == 200, 60, "the API")

    write_sample_data(tmp_path / "sd", num_samples=12, seed=0)
    (tmp_path / "sample.zip").write_bytes(zip_folder(tmp_path / "sd"))

    shell_env = {"PATH": "/usr/bin:/bin", "URL": url, "KEY": KEY}
    paths = {"ds_": "/v1/datasets/", "ps_": "/v1/pairsets/", "tr_": "/v1/trainings/", "ev_": "/v1/evaluations/"}
    for command in commands:
        result = subprocess.run(
            ["bash", "-c", command + " -w '\\n%{http_code}'"], cwd=tmp_path, env=shell_env,
            capture_output=True, text=True, timeout=300,
        )
        body, _, status = result.stdout.rpartition("\n")
        assert status.isdigit() and 200 <= int(status) < 300, (command, result.stdout[-500:], result.stderr[-500:])
        created = re.match(r'\{"id":"((ds_|ps_|tr_|ev_)[a-z0-9]+)"', body)
        if created and (" -F " in command or " -d " in command):  # a create call
            resource_id, prefix = created.group(1), created.group(2)
            shell_env[IDS[prefix]] = resource_id
            # Later examples read the finished resource: wait as a user would, by polling it.
            wait_for(lambda p=paths[prefix] + resource_id: client.get(p).json()["status"] in FINAL, 300, resource_id, interval=0.5)
            assert client.get(paths[prefix] + resource_id).json()["status"] in ("ready", "succeeded")
    assert {"DATASET_ID", "PAIRSET_ID", "TRAINING_ID", "EVALUATION_ID"} <= set(shell_env)
    assert (tmp_path / "pairs.tar.gz").stat().st_size > 0 and (tmp_path / "adapter.tar.gz").stat().st_size > 0
