"""A training's files in the artifact store, and its download archives (DESIGN 2.7, 3.4).

    trainings/{id}/output/checkpoint-N/            the Trainer's checkpoints (complete ones hold checkpoint.json)
    trainings/{id}/output/adapter/                 the final adapter: adapter_config.json,
                                                   adapter_model.safetensors, processor files
    trainings/{id}/{id}-adapter.tar.gz             the adapter archive, built when the training succeeds
    trainings/{id}/archives/checkpoint-N.tar.gz    a checkpoint's adapter files, built on first download

Only the standard library is needed here: the API builds archives without importing the trainer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from core.exports import build_archive
from core.store import ArtifactStore

ADAPTER_DIR = "adapter"  # trainer.train.ADAPTER_DIR: where run_training publishes the adapter
# A checkpoint folder's files that resume a run but are no part of an adapter (trainer.train keeps the same list).
RUN_STATE = (
    "optimizer.pt",
    "scheduler.pt",
    "rng_state*.pth",
    "scaler.pt",
    "trainer_state.json",
    "training_args.bin",
    "README.md",
    "checkpoint.json",
)


def training_dir(store: ArtifactStore, training_id: str) -> Path:
    return store.path("trainings", training_id)


def output_dir(store: ArtifactStore, training_id: str) -> Path:
    """What `trainer.train.run_training` gets as `output_dir`."""
    return training_dir(store, training_id) / "output"


def adapter_dir(store: ArtifactStore, training_id: str) -> Path:
    return output_dir(store, training_id) / ADAPTER_DIR


def adapter_archive_path(store: ArtifactStore, training_id: str) -> Path:
    return training_dir(store, training_id) / f"{training_id}-adapter.tar.gz"


def checkpoint_archive_path(store: ArtifactStore, training_id: str, step: int) -> Path:
    return training_dir(store, training_id) / "archives" / f"checkpoint-{step}.tar.gz"


def build_adapter_archive(store: ArtifactStore, training_id: str, *, rebuild: bool = False) -> Path:
    """The final adapter as .tar.gz (members under `{id}-adapter/`), built once; `rebuild` replaces an
    archive of an earlier adapter (the job calls it so when the training succeeds)."""
    dest = adapter_archive_path(store, training_id)
    if rebuild:
        dest.unlink(missing_ok=True)
    return build_archive(adapter_dir(store, training_id), dest, root=f"{training_id}-adapter")


def build_checkpoint_archive(store: ArtifactStore, training_id: str, step: int, folder: Path) -> Path:
    """A complete checkpoint's (`folder`, of `step`) adapter and processor files, without optimizer or
    RNG state, as .tar.gz, members under `{id}-checkpoint-{step}/`, built once.

    The files are hard-linked into a staging folder (no copy of the weights) and archived from there.
    """
    dest = checkpoint_archive_path(store, training_id, step)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=dest.parent))
    try:
        files = staging / "files"
        shutil.copytree(folder, files, ignore=shutil.ignore_patterns(*RUN_STATE), copy_function=_link_or_copy)
        return build_archive(files, dest, root=f"{training_id}-checkpoint-{step}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)
