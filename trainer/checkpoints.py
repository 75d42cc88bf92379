"""Checkpoints that a reader only ever sees complete.

transformers writes `checkpoint-N/` in place (adapter, optimizer, scheduler, RNG state, trainer_state.json,
one file after the other), so a folder that exists may be half written. Renaming it into place is not
ours to do (the Trainer owns the name, resumes from it and rotates it), so completeness is marked
instead: after the Trainer has finished a checkpoint (its `on_save` event), `CheckpointCallback` fsyncs
the folder's files and then writes `checkpoint.json` (step, time, metrics) atomically (temp file +
rename). Only folders holding that marker are checkpoints: `list_checkpoints` reports those, resumes use
the latest of them, and a folder without it (a crash mid-save) is removed before training starts again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.store import atomic_writer

MARKER = "checkpoint.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint folder."""

    step: int
    path: Path
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "path": str(self.path), "metrics": self.metrics, "created_at": self.created_at}


def _folders(output_dir: Path) -> list[tuple[int, Path]]:
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def list_checkpoints(output_dir: Path) -> list[Checkpoint]:
    """The complete checkpoints under `output_dir`, oldest step first."""
    result = []
    for step, path in _folders(output_dir):
        try:
            meta = json.loads((path / MARKER).read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            continue  # being written, or a leftover of a crash mid-save
        result.append(Checkpoint(step, path, dict(meta.get("metrics", {})), float(meta.get("created_at", 0.0))))
    return result


def latest_checkpoint(output_dir: Path) -> Checkpoint | None:
    """The complete checkpoint with the highest step, if any."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` to disk (a marker or a rename must not get there before the data)."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def mark_complete(path: Path, step: int, metrics: dict[str, float]) -> Checkpoint:
    """Make the finished checkpoint folder `path` durable, then publish it by writing its marker."""
    path = Path(path)
    fsync_tree(path)
    checkpoint = Checkpoint(step, path, dict(metrics), time.time())
    with atomic_writer(path / MARKER, "w") as fh:
        json.dump({"step": step, "metrics": checkpoint.metrics, "created_at": checkpoint.created_at}, fh)
    return checkpoint


def remove_incomplete(output_dir: Path) -> list[Path]:
    """Delete `checkpoint-N` folders without a marker (half-written by a run that died); return them."""
    removed = []
    for _step, path in _folders(output_dir):
        if not (path / MARKER).is_file():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove_all(output_dir: Path) -> None:
    """Delete every `checkpoint-N` folder (a training that starts over must not mix with an old run's)."""
    for _step, path in _folders(output_dir):
        # Unpublish first, so a reader never lists a folder that is being deleted.
        (path / MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
