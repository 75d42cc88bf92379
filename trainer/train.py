"""One DPO + LoRA training on a pair-set export (DESIGN 2.7, 3.3), without Redis or RQ.

`run_training` is what the `train` queue's job calls: model name and folders in, adapter and
checkpoints out, progress through callbacks. It resumes from the latest complete checkpoint in
`output_dir` (see checkpoints.py), so a restarted job continues where the last one stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME

from core.errors import UserError
from core.settings import Settings
from trainer.callbacks import CheckpointCallback
from trainer.checkpoints import (
    MARKER,
    Checkpoint,
    fsync_tree,
    latest_checkpoint,
    list_checkpoints,
    remove_all,
    remove_incomplete,
)
from trainer.config import TrainHyperparameters, build_configs
from trainer.data import load_pairs

ADAPTER_DIR = "adapter"


@dataclass
class TrainResult:
    """What a training produced."""

    global_step: int  # optimizer steps done, counting those of the run resumed from
    total_steps: int  # planned optimizer steps (max_steps, or epochs x steps per epoch)
    start_step: int  # 0, or the step of the checkpoint this run resumed from
    resumed_from: Path | None
    cancelled: bool  # stopped before total_steps (a callback asked to stop): no adapter then
    adapter_dir: Path | None  # output_dir/adapter: adapter_config.json, adapter_model.safetensors, processor files
    metrics: dict[str, float]  # the last logged step's metrics (loss, rewards/..., logps/..., grad_norm)
    summary: dict[str, float]  # the Trainer's end-of-run numbers (train_runtime, train_loss, ...)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    fast_path: bool = False  # the pairs ran packed (trainer.fast); False: TRL's two sequences per pair
    ref_precomputed: bool = False  # the reference log-probs were computed once before training


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_training(
    *,
    model: str,
    export_dir: Path,
    output_dir: Path,
    hp: TrainHyperparameters,
    checkpoint_every: int | None,
    callbacks: Sequence[TrainerCallback] = (),
    resume: bool = True,
    settings: Settings | None = None,
    device: str | None = None,
    num_processes: int = 1,
) -> TrainResult:
    """Train a LoRA adapter with DPO on a pair-set export.

    Args:
        model: a built-in tiny model name, a local model folder or a cached hub id (workers.models.load_model).
        export_dir: the pair-set export (parquet shards under data/).
        output_dir: this training's folder: `checkpoint-N/` folders and, at the end, `adapter/`.
        hp: hyperparameters.
        checkpoint_every: optimizer steps between checkpoints (also one at the last step); None = none.
        callbacks: extra TrainerCallbacks (e.g. ProgressCallback); they run after the one that publishes
            checkpoints, so a checkpoint they hear about is complete.
        resume: continue from the latest complete checkpoint in output_dir if there is one. False starts
            over and deletes output_dir's earlier checkpoints and adapter.
        settings: where built-in models live (process settings by default).
        device: "cuda" or "cpu"; default: cuda when available. Under `accelerate launch` each process
            trains on its own GPU.
        num_processes: how many processes run this same call (`trainer.launch`); each takes
            `per_device_batch_size` pairs per forward pass, only the first writes files.
    Returns:
        Steps, final metrics, adapter folder and the complete checkpoints.
    Raises:
        UserError: unknown model, empty or malformed export.
    """
    from trainer.fast import FastDPOTrainer
    from workers.models import load_model

    output_dir, export_dir = Path(output_dir), Path(export_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    args, lora = build_configs(hp, output_dir, device=device or default_device(), checkpoint_every=checkpoint_every,
                               num_processes=num_processes)
    if args.should_save:
        if resume:
            remove_incomplete(output_dir)
        else:
            remove_all(output_dir)
            shutil.rmtree(output_dir / ADAPTER_DIR, ignore_errors=True)
    start = latest_checkpoint(output_dir) if resume else None
    if start is not None and (done := _finished_state(start)) is not None:
        # A retried job whose training had already finished. (The Trainer would run one step past the end.)
        return _result_from_checkpoint(start, done, output_dir, write=args.should_save)

    dataset = load_pairs(export_dir, cache_dir=output_dir / ".datasets-cache")
    # bf16 weights on GPU (bf16 autocast on top), fp32 on CPU: load_model's defaults for the device.
    handle = load_model(model, settings, device=args.device)
    try:
        trainer = FastDPOTrainer(
            model=handle.model,
            args=args,
            train_dataset=dataset,
            processing_class=handle.processor,
            peft_config=lora,
            callbacks=[CheckpointCallback(), *callbacks],
            fast_path=hp.fast_path,
            precompute_ref_logps=hp.precompute_ref_logps,
        )
    except ValueError as exc:
        # The API checks the target against the model's modules; a model that changed since is the user's to fix too.
        if "target" in str(exc).lower() and "module" in str(exc).lower():
            raise UserError(
                f"lora_target {hp.lora_target!r} matches no module of {model}", code="lora_target_matches_nothing",
                param="hyperparameters.lora_target",
            ) from None
        raise
    trainer.remove_callback(PrinterCallback)  # progress goes through the callbacks, not stdout
    output = trainer.train(resume_from_checkpoint=str(start.path) if start else None)
    state = trainer.state
    cancelled = state.global_step < state.max_steps

    adapter_dir = None
    if not cancelled:
        adapter_dir = output_dir / ADAPTER_DIR
        _save_adapter(trainer, adapter_dir)
    steps = [h for h in state.log_history if "loss" in h]
    last = {k: float(v) for k, v in steps[-1].items() if k not in ("epoch", "step")} if steps else {}
    return TrainResult(
        global_step=state.global_step,
        total_steps=state.max_steps,
        start_step=start.step if start else 0,
        resumed_from=start.path if start else None,
        cancelled=cancelled,
        adapter_dir=adapter_dir,
        metrics=last,
        summary=dict(output.metrics),
        checkpoints=list_checkpoints(output_dir),
        log_history=list(state.log_history),
        fast_path=trainer.fast_path,
        ref_precomputed=trainer.precompute_ref_logps,
    )


_RUN_FILES = ("optimizer.pt", "scheduler.pt", "rng_state*.pth", "trainer_state.json", "training_args.bin",
              "README.md", "scaler.pt", MARKER)


def _finished_state(checkpoint: Checkpoint) -> dict[str, Any] | None:
    """The checkpoint's trainer state if it is the last step of its training, else None."""
    state = json.loads((checkpoint.path / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    return state if state.get("max_steps", 0) > 0 and state["global_step"] >= state["max_steps"] else None


def _result_from_checkpoint(checkpoint: Checkpoint, state: dict[str, Any], output_dir: Path, *,
                            write: bool) -> TrainResult:
    """The result of a finished training, its adapter (re)published from its last checkpoint (if `write`)."""
    if write:
        dest = output_dir / ADAPTER_DIR
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=output_dir))
        shutil.copytree(checkpoint.path, staging, ignore=shutil.ignore_patterns(*_RUN_FILES), dirs_exist_ok=True)
        _publish(staging, dest)
    history = list(state.get("log_history", []))
    return TrainResult(
        global_step=state["global_step"],
        total_steps=state["max_steps"],
        start_step=checkpoint.step,
        resumed_from=checkpoint.path,
        cancelled=False,
        adapter_dir=output_dir / ADAPTER_DIR,
        metrics={k: float(v) for k, v in checkpoint.metrics.items()},
        summary={},
        checkpoints=list_checkpoints(output_dir),
        log_history=history,
    )


def _save_adapter(trainer: Any, dest: Path) -> None:
    """Write the adapter and processor files to `dest` atomically: into a temp folder, then rename."""
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent)) if trainer.args.should_save else None
    # save_model is collective under distributed training (it gathers the state dict); only rank 0 writes.
    trainer.save_model(str(staging) if staging else None)
    if staging is None:
        return
    for leftover in ("training_args.bin", "README.md"):  # run files, not part of the adapter
        (staging / leftover).unlink(missing_ok=True)
    _publish(staging, dest)


def _publish(staging: Path, dest: Path) -> None:
    """Rename the finished folder `staging` to `dest`, replacing an older one.

    A reader sees the old folder or the new one, complete; only when replacing is there a moment with none.
    """
    fsync_tree(staging)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}-old-{os.getpid()}")
        os.rename(dest, old)
    os.rename(staging, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(OSError):
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
