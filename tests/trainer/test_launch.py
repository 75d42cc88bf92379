"""One training on 2 processes (DDP with gloo on CPU), launched as the trainer launches it (`trainer.launch`,
`accelerate launch`): the same loss curve as one process with the same global batch, a cancel that
reaches every rank, a SIGKILL mid-run after which the training resumes, and an adapter identical in form."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.e2e.conftest import ROOT, wait_for
from tests.e2e.test_workers_e2e import _pids_with_env
from tests.trainer.test_train import FAST
from trainer.checkpoints import latest_checkpoint
from trainer.config import TrainHyperparameters
from trainer.launch import launch_command, resolve_processes, train

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc")

MODEL, MAX_STEPS, EVERY = "tiny-llava", 8, 2
# NLL weight 0: TRL's SFT term is a mean over each rank's own tokens, so unlike DPO's per-pair mean it does
# not add up across ranks to the one-process value. No LoRA dropout: its masks are drawn per rank.
BASE = {**FAST, "nll_weight": 0.0, "lora_dropout": 0.0, "max_steps": MAX_STEPS}

# A work horse of its own, to SIGKILL: it launches the training exactly as the trainer's does.
PARENT = """
import json, sys
from pathlib import Path
from core.settings import Settings
from trainer.config import TrainHyperparameters
from trainer.launch import launch_command, resolve_processes, train
a = json.loads(sys.argv[1])
train(num_processes=2, report=lambda event: None, should_stop=lambda: False, model=a["model"],
      export_dir=Path(a["export"]), output_dir=Path(a["out"]), hp=TrainHyperparameters(**a["hp"]),
      checkpoint_every=a["every"], settings=Settings(data_dir=Path(a["data_dir"])), device="cpu")
"""


def _curve(result) -> list[tuple[int, float, float]]:
    return [(h["step"], h["loss"], h["rewards/margins"]) for h in result.log_history if "loss" in h]


def _tensors(adapter: Path) -> dict[str, tuple]:
    with safe_open(adapter / "adapter_model.safetensors", "pt") as fh:
        return {k: (tuple(fh.get_tensor(k).shape), fh.get_tensor(k).dtype) for k in fh.keys()}  # noqa: SIM118


def test_two_processes_train_like_one_stop_together_and_resume_after_a_sigkill(tmp_path, tiny_settings, pair_exports):
    export = pair_exports[MODEL]
    common = {"model": MODEL, "export_dir": export, "settings": tiny_settings, "device": "cpu"}
    one = train(num_processes=1, report=lambda event: None, should_stop=lambda: False, output_dir=tmp_path / "one",
                hp=TrainHyperparameters(per_device_batch_size=2, **BASE), checkpoint_every=None, **common)
    hp = TrainHyperparameters(per_device_batch_size=1, **BASE)  # x 2 processes: the same 2 pairs per step
    out = tmp_path / "two"

    # 1. Cancelled as soon as rank 0 has reported a step: every rank stops at the same step (a rank that
    # went on would hang the others in DDP), after a checkpoint of it.
    events: list[dict] = []
    first = train(num_processes=2, report=events.append, should_stop=lambda: any(e["event"] == "step" for e in events),
                  output_dir=out, hp=hp, checkpoint_every=EVERY, **common)
    assert first.cancelled and 1 <= first.global_step < MAX_STEPS and first.adapter_dir is None
    assert first.checkpoints[-1].step == first.global_step
    # Rank 0 alone reports: each step once.
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, first.global_step + 1))
    assert not list(out.glob(".launch-*"))  # the launch's files are gone

    # 2. Resumed by a work horse of its own, which is SIGKILLed once a later checkpoint is complete: the
    # launcher and both ranks die with it.
    marker = uuid.uuid4().hex
    args = {"model": MODEL, "export": str(export), "out": str(out), "hp": hp.to_dict(), "every": EVERY,
            "data_dir": str(tiny_settings.data_dir)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, json.dumps(args)], cwd=ROOT,
                              env={**os.environ, "MIADPO_TEST_LAUNCH": marker})
    try:
        wait_for(lambda: latest_checkpoint(out).step > first.global_step or parent.poll() is not None, 180,
                 "a checkpoint after the cancelled one", interval=0.05)
        assert parent.poll() is None, "the training ended before it could be killed"
        assert len(_pids_with_env(f"MIADPO_TEST_LAUNCH={marker}")) >= 4  # horse, launcher, 2 ranks
    finally:
        parent.kill()
        parent.wait()
    wait_for(lambda: not _pids_with_env(f"MIADPO_TEST_LAUNCH={marker}"), 10, "the launcher and the ranks to die")
    killed_at = latest_checkpoint(out).step
    assert first.global_step < killed_at < MAX_STEPS

    # 3. Resumed once more, to the end: the curve of one process with the same global batch.
    last = train(num_processes=2, report=lambda event: None, should_stop=lambda: False, output_dir=out, hp=hp,
                 checkpoint_every=EVERY, **common)
    assert (last.start_step, last.global_step, last.cancelled) == (killed_at, MAX_STEPS, False)
    curve, reference = _curve(last), _curve(one)
    assert [s for s, _, _ in curve] == [s for s, _, _ in reference] == list(range(1, MAX_STEPS + 1))
    for (step, loss, margin), (_, ref_loss, ref_margin) in zip(curve, reference, strict=True):
        assert loss == pytest.approx(ref_loss, abs=1e-4), step
        assert margin == pytest.approx(ref_margin, abs=1e-4), step
    assert reference[-1][2] != 0.0  # it did learn something to compare

    # The adapter: the same files, tensors and config as one process writes (no DDP wrapper in the names).
    assert sorted(p.name for p in last.adapter_dir.iterdir()) == sorted(p.name for p in one.adapter_dir.iterdir())
    assert _tensors(last.adapter_dir) == _tensors(one.adapter_dir)
    config = json.loads((last.adapter_dir / "adapter_config.json").read_text())
    assert config == json.loads((one.adapter_dir / "adapter_config.json").read_text())


def test_how_many_processes_and_how_they_are_launched(tmp_path):
    assert resolve_processes("auto", "cpu") == 1 and resolve_processes(3, "cpu") == 3
    assert resolve_processes("auto", "cuda") == max(1, torch.cuda.device_count())
    ddp = launch_command(4, "cuda", tmp_path / "spec.json", None)
    assert ddp[ddp.index("--num_processes") + 1] == "4" and "--multi_gpu" in ddp
    assert ddp[-3:] == ["-m", "trainer.launch", str(tmp_path / "spec.json")]  # the ranks run trainer.launch.main
    zero2 = ROOT / "deploy" / "accelerate" / "deepspeed-zero2.yaml"
    deepspeed = launch_command(8, "cuda", tmp_path / "spec.json", zero2)
    assert deepspeed[deepspeed.index("--config_file") + 1] == str(zero2) and "--multi_gpu" not in deepspeed
