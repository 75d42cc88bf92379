"""`miadpo demo`, the README's quickstart, as a user runs it: its own stack (`miadpo up` with its own
redis-server), the sample data uploaded with `core.client.Client`, a pair set that chains a training, the
adapter downloaded and unpacked, the stack stopped. Made small with the demo's own knobs (model, prompts,
training steps), so the test does not depend on what the demo prints or on its default model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT
from tests.e2e.test_workers_e2e import _pids_with_env

KNOBS = ["--model", "tiny-llava", "--num", "8", "--max-steps", "2"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_miadpo_demo_on_a_small_configuration_leaves_an_adapter_and_no_processes(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIADPO_") and k != "REDIS_URL"}
    env["MIADPO_DEVICE"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--out", str(out), *KNOBS],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    log = out / "stack" / "stack.log"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + (log.read_text()[-3000:] if log.exists() else "")
    (adapter,) = (out / "adapter").glob("*-adapter")
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (adapter / name).is_file(), name
    assert (out / "adapter.tar.gz").is_file() and not list(out.glob("*.part"))
    assert (out / "sample-data").is_dir() and log.is_file()
    # Everything the demo started (the stack, its redis-server, workers, trainer) is gone with it.
    assert _pids_with_env(f"MIADPO_DATA_DIR={(out / 'stack').resolve()}") == []
