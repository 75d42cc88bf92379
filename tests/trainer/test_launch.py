"""One training on 2 processes (DDP with gloo on CPU), launched as the trainer launches it (`trainer.launch`,
`accelerate launch`): the same loss curve as one process with the same global batch, a SIGKILL mid-run
after which the training resumes, and an adapter identical in form; a cancel seen by rank 0 stops every
rank at the same step."""

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

from core.process import free_port
from tests.e2e.conftest import ROOT, wait_for
from tests.e2e.test_workers_e2e import _pids_with_env
from tests.trainer.test_train import FAST
from trainer.checkpoints import latest_checkpoint
from trainer.config import TrainHyperparameters
from trainer.launch import launch_command, resolve_processes, train

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc")

MODEL, MAX_STEPS, EVERY = "tiny-llava", 6, 2
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


def test_two_processes_train_like_one_and_resume_after_a_sigkill(tmp_path, tiny_settings, pair_exports):
    export = pair_exports[MODEL]
    common = {"model": MODEL, "export_dir": export, "settings": tiny_settings, "device": "cpu"}
    one = train(num_processes=1, report=lambda event: None, should_stop=lambda: False, output_dir=tmp_path / "one",
                hp=TrainHyperparameters(per_device_batch_size=2, **BASE), checkpoint_every=None, **common)
    hp = TrainHyperparameters(per_device_batch_size=1, **BASE)  # x 2 processes: the same 2 pairs per step
    out = tmp_path / "two"

    # 1. Started by a work horse of its own, which is SIGKILLed once the first checkpoint is complete: the
    # launcher and both ranks die with it.
    marker = uuid.uuid4().hex
    args = {"model": MODEL, "export": str(export), "out": str(out), "hp": hp.to_dict(), "every": EVERY,
            "data_dir": str(tiny_settings.data_dir)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, json.dumps(args)], cwd=ROOT,
                              env={**os.environ, "MIADPO_TEST_LAUNCH": marker})
    try:
        wait_for(lambda: latest_checkpoint(out) is not None or parent.poll() is not None, 240,
                 "the first checkpoint", interval=0.05)
        assert parent.poll() is None, "the training ended before it could be killed"
        assert len(_pids_with_env(f"MIADPO_TEST_LAUNCH={marker}")) >= 4  # horse, launcher, 2 ranks
    finally:
        parent.kill()
        parent.wait()
    wait_for(lambda: not _pids_with_env(f"MIADPO_TEST_LAUNCH={marker}"), 10, "the launcher and the ranks to die")
    killed_at = latest_checkpoint(out).step
    assert EVERY <= killed_at < MAX_STEPS
    assert not (out / "adapter").exists()

    # 2. Resumed, to the end: the curve of one process with the same global batch. Rank 0 alone reports.
    events: list[dict] = []
    last = train(num_processes=2, report=events.append, should_stop=lambda: False, output_dir=out, hp=hp,
                 checkpoint_every=EVERY, **common)
    assert (last.start_step, last.global_step, last.cancelled) == (killed_at, MAX_STEPS, False)
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(killed_at + 1, MAX_STEPS + 1))
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == list(range(killed_at + EVERY, MAX_STEPS + 1, EVERY))
    assert not list(out.glob(".launch-*"))  # the launches' own files are gone, the killed one's too
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


# One rank of a bare 2-process gloo group: what ProgressCallback decides after a step when only rank 0 is
# asked whether to stop (as in a launched training: the others must leave at the same step, or DDP hangs).
RANK = """
import json, os, sys
import torch.distributed as dist
from types import SimpleNamespace
from transformers import TrainerControl, TrainerState
from trainer.callbacks import ProgressCallback
rank, stop = int(os.environ["RANK"]), sys.argv[1] == "stop"
dist.init_process_group("gloo", rank=rank, world_size=2)
asked = []
callback = ProgressCallback(lambda event: None, should_stop=lambda: asked.append(rank) is None and stop)
state, control = TrainerState(global_step=3, is_world_process_zero=rank == 0), TrainerControl()
callback.on_step_end(SimpleNamespace(device="cpu", save_strategy="steps"), state, control)
print(json.dumps({"stop": control.should_training_stop, "save": control.should_save, "asked": asked}))
dist.destroy_process_group()
"""


def test_a_cancel_seen_by_rank_0_stops_every_rank_at_the_same_step():
    # (The answer "go on" is agreed the same way after every step of the launched training above.)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, "stop"], cwd=ROOT, env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, text=True) for rank in (0, 1)]
    answers = [json.loads(rank.communicate(timeout=120)[0].strip().splitlines()[-1]) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks)
    assert answers == [
        {"stop": True, "save": True, "asked": [0]},  # rank 0 polls the cancel flag ...
        {"stop": True, "save": True, "asked": []},  # ... and the other follows its answer, checkpoint included
    ]
