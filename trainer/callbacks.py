"""Trainer callbacks: publish complete checkpoints, report progress, stop on cancel.

Both are plain `transformers.TrainerCallback`s; the RQ task passes a `ProgressCallback` whose `report`
writes to the job record and whose `should_stop` reads the cancel flag. Nothing here knows about Redis.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from trainer.checkpoints import mark_complete

_NOT_METRICS = {"epoch", "learning_rate", "step"}


def _metrics(logs: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in logs.items() if k not in _NOT_METRICS and isinstance(v, int | float)}


class CheckpointCallback(TrainerCallback):
    """After the Trainer has written `checkpoint-N`, fsync it and publish it with its marker (see checkpoints.py).

    `run_training` installs it ahead of the caller's callbacks, so by the time their `on_save` runs the
    checkpoint is complete and listed.
    """

    def __init__(self) -> None:
        self.last_metrics: dict[str, float] = {}

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.last_metrics = _metrics(logs)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if args.should_save:  # the process that writes files (rank 0)
            path = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
            mark_complete(path, state.global_step, self.last_metrics)


class ProgressCallback(TrainerCallback):
    """Report steps, metrics and checkpoints; stop between optimizer steps when asked.

    Args:
        report: called with one dict per event, on the main process only:
            {"event": "step", "step", "total_steps", "epoch", "lr", "metrics": {loss, rewards/chosen,
            rewards/rejected, rewards/margins, rewards/accuracies, logps/..., grad_norm, ...}} after each
            logging step (TRL's metric names, unprefixed);
            {"event": "checkpoint", "step", "path", "metrics"} after a checkpoint is complete;
            {"event": "summary", "step", "total_steps", "metrics": {train_runtime, train_loss, ...}} at the end.
        should_stop: polled after every optimizer step (on the main process; the answer is shared with
            the others so they all stop at the same step). When it returns True training stops after
            that step, and, if checkpointing is on, a checkpoint of that step is saved first, so a
            cancelled training can later be resumed without losing its work.
    """

    def __init__(self, report: Callable[[dict[str, Any]], None],
                 should_stop: Callable[[], bool] | None = None) -> None:
        self.report = report
        self.should_stop = should_stop
        self.stopped_at: int | None = None
        self._last_metrics: dict[str, float] = {}

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs or not state.is_world_process_zero:
            return
        if "train_runtime" in logs:
            self.report({"event": "summary", "step": state.global_step, "total_steps": state.max_steps,
                         "metrics": _metrics(logs)})
            return
        metrics = _metrics(logs)
        self._last_metrics = metrics
        self.report({
            "event": "step",
            "step": state.global_step,
            "total_steps": state.max_steps,
            "epoch": logs.get("epoch", state.epoch),
            "lr": logs.get("learning_rate"),
            "metrics": metrics,
        })

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            path = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
            self.report({"event": "checkpoint", "step": state.global_step, "path": str(path),
                         "metrics": dict(self._last_metrics)})

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.should_stop is None:
            return
        stop = _agree(bool(self.should_stop()) if state.is_world_process_zero else False, args)
        if stop:
            self.stopped_at = state.global_step
            control.should_training_stop = True
            if args.save_strategy != "no":
                control.should_save = True


def _agree(flag: bool, args: TrainingArguments) -> bool:
    """Rank 0's flag on every process (all must leave the loop at the same step, or DDP hangs)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], device=args.device)
    dist.broadcast(value, src=0)
    return bool(value.item())
