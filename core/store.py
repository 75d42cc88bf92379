"""The artifact store: files under one root, written atomically, images content-addressed.

Every write goes to a temporary file in the destination folder and is renamed into place, so a reader
(or a retried job) sees either the old file or the complete new one, never half of one. Paths coming
from users go through `safe_relpath`, which refuses anything that could leave the root.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from core.errors import UserError

IMAGES_DIR = "images"


def safe_relpath(user_path: str, *, param: str = "path") -> PurePosixPath:
    """Normalise a relative path given by a user; refuse absolute paths, `..`, drives and NUL bytes."""
    if not user_path or "\x00" in user_path:
        raise UserError(f"invalid path {user_path!r}", code="invalid_path", param=param)
    text = user_path.replace("\\", "/")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise UserError(f"absolute path not allowed: {user_path!r}", code="invalid_path", param=param)
    parts = [p for p in PurePosixPath(text).parts if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise UserError(f"path escapes its folder: {user_path!r}", code="invalid_path", param=param)
    return PurePosixPath(*parts)


def safe_join(root: Path, user_path: str, *, param: str = "path") -> Path:
    """`root / user_path`, guaranteed to stay inside root (also through symlinks already on disk)."""
    rel = safe_relpath(user_path, param=param)
    joined = (root / rel).resolve()
    if not joined.is_relative_to(root.resolve()):
        raise UserError(f"path escapes its folder: {user_path!r}", code="invalid_path", param=param)
    return joined


@contextlib.contextmanager
def atomic_writer(dest: Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `dest`; on success fsync and rename it over `dest`, else delete it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class ArtifactStore:
    """Files under `root`: datasets, images, shard outputs, exports, checkpoints."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, *parts: str) -> Path:
        """An internal path under the root (parts are ours, not a user's)."""
        return self.root.joinpath(*parts)

    def write_bytes(self, rel: str, data: bytes) -> Path:
        """Write `data` atomically at `rel`; return the absolute path."""
        dest = self.path(rel)
        with atomic_writer(dest) as fh:
            fh.write(data)
        return dest

    def write_text(self, rel: str, text: str) -> Path:
        """Write UTF-8 text atomically at `rel`."""
        return self.write_bytes(rel, text.encode("utf-8"))

    # Content-addressed images: the ref is the sha256 of the stored (normalised) bytes.
    def image_path(self, ref: str) -> Path:
        """Where the image with this sha256 ref lives (two-level fan-out keeps folders small)."""
        if len(ref) != 64 or any(c not in "0123456789abcdef" for c in ref):
            raise UserError(f"not an image ref: {ref!r}", code="invalid_image_ref")
        return self.path(IMAGES_DIR, ref[:2], ref[2:4], ref)

    def put_image_bytes(self, data: bytes) -> str:
        """Store encoded image bytes (JPEG or PNG, already normalised) once; return their sha256 ref."""
        ref = hashlib.sha256(data).hexdigest()
        dest = self.image_path(ref)
        if not dest.exists():
            with atomic_writer(dest) as fh:
                fh.write(data)
        return ref

    def has_image(self, ref: str) -> bool:
        return self.image_path(ref).exists()
