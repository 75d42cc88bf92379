"""A pair set's files in the artifact store, and reading its export without the pipeline (DESIGN 2.6, 3.4).

    pairsets/{id}/shards/{i:05d}.jsonl   one shard job's records (workers.pipeline.write_records)
    pairsets/{id}/export/                the export: data/train-NNNNN.parquet, README.md, histograms/
    pairsets/{id}/{id}.tar.gz            the download archive of the export, built on first download

The parquet shards are TRL's vision preference format (workers.export), rows in recipe order. A row's
uid is `{seed}-{index:07d}`, so uids sort in row order and a uid is a page cursor; row-group statistics
say which row group holds a uid. Only pyarrow is needed here, so the API never imports the pipeline, and
the images column is read only for the one row group that holds the image asked for.
"""

from __future__ import annotations

import bisect
import gzip
import math
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.store import ArtifactStore, atomic_writer

IMAGE_TOKEN = "<image>"
PREVIEW_COLUMNS = (
    "uid",
    "source_id",
    "format",
    "n_images",
    "target_index",
    "prompt",
    "chosen",
    "rejected",
    "attention_ratio",
    "perplexity",
    "length_ratio",
    "edit_distance",
)
_FLOATS = ("attention_ratio", "perplexity", "length_ratio", "edit_distance")
_GZIP_LEVEL = 3  # parquet pages and PNGs are compressed already: a higher level buys little, costs much


def pairset_dir(store: ArtifactStore, pairset_id: str) -> Path:
    return store.path("pairsets", pairset_id)


def shard_path(store: ArtifactStore, pairset_id: str, index: int) -> Path:
    return pairset_dir(store, pairset_id) / "shards" / f"{index:05d}.jsonl"


def export_dir(store: ArtifactStore, pairset_id: str) -> Path:
    return pairset_dir(store, pairset_id) / "export"


def archive_path(store: ArtifactStore, pairset_id: str) -> Path:
    return pairset_dir(store, pairset_id) / f"{pairset_id}.tar.gz"


# --------------------------------------------------------------------------------------------------
# Preview


def _parquet_files(export: Path) -> list[Path]:
    return sorted((export / "data").glob("train-*.parquet"))


def _row_groups(export: Path) -> Iterator[tuple[Any, int, str | None, str | None]]:
    """(ParquetFile, row group, min uid, max uid) in row order; min/max None where statistics are missing."""
    import pyarrow.parquet as pq

    for path in _parquet_files(export):
        pf = pq.ParquetFile(path)
        # Statistics are per leaf column: nested columns (images, messages) come before uid.
        uid_col = next(i for i in range(pf.metadata.num_columns) if pf.schema.column(i).path == "uid")
        for i in range(pf.num_row_groups):
            stats = pf.metadata.row_group(i).column(uid_col).statistics
            if stats is not None and stats.has_min_max:
                yield pf, i, _text(stats.min), _text(stats.max)
            else:
                yield pf, i, None, None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _messages_text(messages: list[dict[str, Any]] | None) -> str:
    """Conversational messages as one text, with `<image>` where an image part is."""
    return "".join(
        IMAGE_TOKEN if part["type"] == "image" else (part.get("text") or "")
        for message in messages or []
        for part in message["content"]
    )


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _preview_row(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    for name in ("prompt", "chosen", "rejected"):
        row[name] = _messages_text(row[name])
    for name in _FLOATS:
        row[name] = _finite(row[name])  # JSON has no NaN or infinity
    return row


def preview_page(export: Path, *, limit: int, after: str | None = None) -> tuple[list[dict[str, Any]], bool]:
    """Up to `limit` pairs after the uid `after`, in row order, without their images; and has_more.

    Each row: uid, source_id, format, n_images, target_index, prompt / chosen / rejected as text (the
    prompt with `<image>` placeholders), attention_ratio, perplexity, length_ratio, edit_distance.
    """
    rows: list[dict[str, Any]] = []
    for pf, group, _, high in _row_groups(export):
        if after is not None and high is not None and high <= after:
            continue  # the whole row group is before the cursor
        table = pf.read_row_group(group, columns=list(PREVIEW_COLUMNS))
        uids = table.column("uid").to_pylist()
        start = bisect.bisect_right(uids, after) if after is not None else 0
        for row in table.slice(start, limit + 1 - len(rows)).to_pylist():
            rows.append(_preview_row(row))
        if len(rows) > limit:
            break
    return rows[:limit], len(rows) > limit


def pair_image(export: Path, uid: str, index: int) -> bytes | None:
    """The encoded bytes (PNG) of image `index` of the pair `uid`; None when there is no such image."""
    for pf, group, low, high in _row_groups(export):
        if low is not None and high is not None and not low <= uid <= high:
            continue
        uids = pf.read_row_group(group, columns=["uid"]).column("uid").to_pylist()
        if uid not in uids:
            continue
        images = pf.read_row_group(group, columns=["images"]).column("images")[uids.index(uid)].as_py()
        if not 0 <= index < len(images):
            return None
        return images[index]["bytes"]
    return None


# --------------------------------------------------------------------------------------------------
# Download archive


def _reset(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """The same bytes for the same files: no owners, times or local permissions in the archive."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    info.mode = 0o755 if info.isdir() else 0o644
    return info


def build_archive(source: Path, dest: Path, *, root: str) -> Path:
    """`source` as a .tar.gz at `dest` (members under `root/`), built once: an existing `dest` is
    returned as it is. Written to a temporary file and renamed, so two concurrent first downloads
    each build a complete archive and a reader never sees half of one."""
    if dest.is_file():
        return dest
    if not source.is_dir():
        raise FileNotFoundError(source)
    with (
        atomic_writer(dest) as fh,
        gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=_GZIP_LEVEL, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in sorted(source.rglob("*")):
            tar.add(path, arcname=f"{root}/{path.relative_to(source).as_posix()}", recursive=False, filter=_reset)
    dest.chmod(0o644)
    return dest
