"""One training on N processes (DESIGN 3.3, 7): the same `run_training`, launched by `accelerate launch`.

    trainer work horse: train()            N = 1: run_training in this process
      `-- accelerate launch (torchrun)     N > 1: one process per GPU (DDP; gloo on CPU), started from here
            |-- rank 0: run_training       writes checkpoints, the adapter, the events and the result
            `-- rank k: run_training       trains its share of every batch

Every rank runs `run_training` as the single process does; the Trainer (accelerate underneath) splits
the batches and averages the gradients, and only rank 0 writes files (`args.should_save`). Rank 0 alone
reports: it appends its progress events to a file of the launch that `train` relays to `report` as they
come, and `should_stop` (polled here) becomes a cancel file that rank 0 reads after every step and
broadcasts, so all ranks stop at the same step. Each process dies with its parent (PR_SET_PDEATHSIG):
the launcher with the work horse (RQ's stop, a timeout, the trainer's death), the ranks with the
launcher. A rank that fails ends the launch (torchrun stops the others); a `UserError` in rank 0 comes
back as that `UserError`, anything else as a `TrainingProcessesFailed`, which the job retries (resuming).

`MIADPO_ACCELERATE_CONFIG` names an `accelerate config` file to launch with instead of plain DDP:
deploy/accelerate/deepspeed-zero2.yaml is the official script's DeepSpeed ZeRO-2 set-up (untested here:
no GPU, no deepspeed).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import UserError
from core.process import die_with_parent, free_port
from core.settings import Settings
from core.store import atomic_writer
from trainer.checkpoints import Checkpoint
from trainer.config import TrainHyperparameters

if TYPE_CHECKING:  # torch and transformers only where they run: a rank sets the libraries up first
    from trainer.train import TrainResult

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], None]
_POLL_S = 0.2


class TrainingProcessesFailed(RuntimeError):
    """The launched training processes ended in an error (a transient fault as far as the job knows)."""


def resolve_processes(setting: int | str, device: str) -> int:
    """How many processes one training runs on: the setting, or for `auto` every CUDA device (1 on CPU)."""
    if setting != "auto":
        return int(setting)
    if device.startswith("cuda"):
        import torch

        return max(1, torch.cuda.device_count())
    return 1


def train(
    *,
    num_processes: int,
    report: Report,
    should_stop: Callable[[], bool],
    model: str,
    export_dir: Path,
    output_dir: Path,
    hp: TrainHyperparameters,
    checkpoint_every: int | None,
    settings: Settings,
    device: str,
    accelerate_config: Path | None = None,
) -> TrainResult:
    """Train on `num_processes` processes of this machine; progress goes to `report`, and the training
    stops (after a checkpoint) once `should_stop()` is true. Always resumes from the latest complete
    checkpoint in `output_dir` (see `run_training`).

    Raises:
        UserError: refused by the training itself (unknown model, malformed export, ...).
        TrainingProcessesFailed: a launched process failed or was killed.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if num_processes == 1:
        from trainer.callbacks import ProgressCallback
        from trainer.train import run_training

        return run_training(
            model=model, export_dir=export_dir, output_dir=output_dir, hp=hp, checkpoint_every=checkpoint_every,
            callbacks=[ProgressCallback(report, should_stop=should_stop)], resume=True, settings=settings, device=device,
        )  # fmt: skip
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(".launch-*"):  # of a launch killed with its work horse (one job per folder)
        shutil.rmtree(stale, ignore_errors=True)
    run = Path(tempfile.mkdtemp(prefix=".launch-", dir=output_dir))
    try:
        spec = {
            "model": model, "export_dir": str(export_dir), "output_dir": str(output_dir), "hp": hp.to_dict(),
            "checkpoint_every": checkpoint_every, "data_dir": str(settings.data_dir), "device": device,
            "num_processes": num_processes, "run": str(run),
        }  # fmt: skip
        (run / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        cmd = launch_command(num_processes, device, run / "spec.json", accelerate_config)
        log.info("training on %d processes: %s", num_processes, " ".join(cmd))
        # Same process group as the work horse: RQ's stop command kills the group; PDEATHSIG covers the rest.
        proc = subprocess.Popen(cmd, preexec_fn=die_with_parent)  # noqa: PLW1509 - needed: see die_with_parent
        events = _EventReader(run / "events.jsonl")
        cancel = run / "cancel"
        try:
            while proc.poll() is None:
                for event in events.read():
                    report(event)
                if not cancel.exists() and should_stop():
                    cancel.touch()
                time.sleep(_POLL_S)
            for event in events.read():
                report(event)
        finally:
            if proc.poll() is None:  # this process is leaving (a job timeout, an exception in `report`)
                proc.kill()
                proc.wait()
        if (run / "error.json").is_file():
            error = json.loads((run / "error.json").read_text(encoding="utf-8"))
            raise UserError(error["message"], code=error["code"], param=error["param"])
        if proc.returncode != 0 or not (run / "result.json").is_file():
            raise TrainingProcessesFailed(
                f"the {num_processes} training processes ended with exit status {proc.returncode}; see the trainer's log"
            )
        return _result_from_json(json.loads((run / "result.json").read_text(encoding="utf-8")))
    finally:
        shutil.rmtree(run, ignore_errors=True)


def launch_command(num_processes: int, device: str, spec: Path, accelerate_config: Path | None) -> list[str]:
    """`accelerate launch` of this module's `main` on `num_processes` processes of this machine."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1", "--main_process_port", str(free_port())]  # fmt: skip
    if accelerate_config is not None:
        cmd += ["--config_file", str(accelerate_config)]
    else:
        # `--multi_gpu` is accelerate's torchrun launcher; on a machine without CUDA its ranks train on CPU
        # with gloo. Precision is the Trainer's (bf16 on GPU, build_configs), not the launcher's.
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*cmd, "-m", __name__, str(spec)]


class _EventReader:
    """The complete lines rank 0 has appended to the events file so far, each once."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


def _result_to_json(result: TrainResult) -> dict[str, Any]:
    data = asdict(result)
    data["resumed_from"] = str(result.resumed_from) if result.resumed_from else None
    data["adapter_dir"] = str(result.adapter_dir) if result.adapter_dir else None
    data["checkpoints"] = [c.to_dict() for c in result.checkpoints]
    return data


def _result_from_json(data: dict[str, Any]) -> TrainResult:
    from trainer.train import TrainResult

    checkpoints = [Checkpoint(c["step"], Path(c["path"]), c["metrics"], c["created_at"]) for c in data.pop("checkpoints")]
    resumed, adapter = data.pop("resumed_from"), data.pop("adapter_dir")
    return TrainResult(**data, checkpoints=checkpoints, resumed_from=Path(resumed) if resumed else None,
                       adapter_dir=Path(adapter) if adapter else None)


def main(argv: Sequence[str] | None = None) -> int:
    """One rank: `python -m trainer.launch SPEC` under `accelerate launch` (see `train`)."""
    die_with_parent()
    from core.runtime import configure_libraries

    configure_libraries()
    from accelerate import PartialState

    from trainer.callbacks import ProgressCallback
    from trainer.train import run_training

    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text(encoding="utf-8"))
    run = Path(spec["run"])
    state = PartialState(cpu=spec["device"] == "cpu")  # the process group the Trainer then uses
    events = open(run / "events.jsonl", "a", encoding="utf-8") if state.is_main_process else None  # noqa: SIM115

    def report(event: dict[str, Any]) -> None:  # ProgressCallback calls it on rank 0 only
        assert events is not None
        events.write(json.dumps(event) + "\n")
        events.flush()

    try:
        result = run_training(
            model=spec["model"], export_dir=Path(spec["export_dir"]), output_dir=Path(spec["output_dir"]),
            hp=TrainHyperparameters.from_dict(spec["hp"]), checkpoint_every=spec["checkpoint_every"],
            callbacks=[ProgressCallback(report, should_stop=(run / "cancel").exists)], resume=True,
            settings=Settings(data_dir=Path(spec["data_dir"])), device=spec["device"], num_processes=spec["num_processes"],
        )  # fmt: skip
    except UserError as exc:
        if state.is_main_process:
            with atomic_writer(run / "error.json", "w") as fh:
                json.dump({"message": exc.message, "code": exc.code, "param": exc.param}, fh)
        raise
    finally:
        if events is not None:
            events.close()
    if state.is_main_process:
        with atomic_writer(run / "result.json", "w") as fh:
            json.dump(_result_to_json(result), fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
