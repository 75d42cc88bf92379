"""Ingestion: turn an uploaded dataset (archive, folder or single file) into the normalised dataset.

Input (DESIGN 2.1): LLaVA rows (JSON list or JSONL, `conversations`), simple JSONL rows
(`question`/`answer`), or a Parquet file written by Hugging Face `datasets` with an Image column. Output:
`core.dataset` samples, one per usable row, each pointing at a content-addressed RGB image in the store.

Who is at fault decides how a fault is reported. Anything wrong with the upload as a whole (an unsafe or
oversized archive, no dataset file, a JSON file that is not a list) raises `UserError`. Anything wrong with
one row becomes a `Problem` in the manifest: reported, never silently dropped, never fatal.

Rows are streamed and images are decoded one at a time, so memory does not grow with the dataset (except
for a JSON list, which the json module has to parse whole).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import ExifTags, Image, ImageOps

from core.dataset import Manifest, Problem, Sample, dataset_dir, write_dataset
from core.errors import UserError
from core.settings import Settings
from core.store import ArtifactStore, safe_join

SOURCE_FORMATS = ("llava", "jsonl", "parquet")
_DATASET_SUFFIXES = {".json": ("llava", "jsonl"), ".jsonl": ("llava", "jsonl"), ".parquet": ("parquet",)}
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_COPY_CHUNK = 1 << 20
# Small members compress absurdly well (an empty-ish JSON, a blank mask) and cost nothing to extract;
# the ratio guard is only about members that could blow up into something big.
_RATIO_FLOOR_BYTES = 1 << 20
_PARQUET_BATCH_ROWS = 256
_PROBLEMS_IN_MESSAGE = 5
_DATASET_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# `<image>` plus the newline that LLaVA puts next to it ("<image>\nQ" or "Q\n<image>").
_IMAGE_TOKEN = re.compile(r"\n?<image>\n?")
_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


@dataclass(frozen=True)
class IngestLimits:
    """What one upload may cost us; see `core.settings.Settings` for the meaning of each field."""

    max_archive_bytes: int
    max_archive_members: int
    max_compression_ratio: float
    max_image_pixels: int
    max_answer_chars: int

    def __post_init__(self) -> None:
        for name in ("max_archive_bytes", "max_archive_members", "max_image_pixels", "max_answer_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.max_compression_ratio > 1:
            raise ValueError(f"max_compression_ratio must be > 1, got {self.max_compression_ratio!r}")

    @classmethod
    def from_settings(cls, settings: Settings) -> IngestLimits:
        return cls(
            max_archive_bytes=settings.max_archive_bytes,
            max_archive_members=settings.max_archive_members,
            max_compression_ratio=settings.max_compression_ratio,
            max_image_pixels=settings.max_image_pixels,
            max_answer_chars=settings.max_answer_chars,
        )


def ingest(
    source: Path,
    store: ArtifactStore,
    dataset_id: str,
    *,
    limits: IngestLimits,
    source_format: str | None = None,
) -> Manifest:
    """Read a dataset upload, store its images and write the normalised dataset.

    Args:
        source: a .zip, .tar, .tar.gz/.tgz archive, a folder, or a single .json/.jsonl/.parquet file.
            Image paths in JSON rows are relative to the dataset file's folder (falling back to the
            archive or folder root) and may not leave it.
        store: the artifact store; images go to its content-addressed area, the dataset to
            `datasets/{dataset_id}/`, archives are extracted under `tmp/` and removed afterwards.
        dataset_id: the id to write the dataset under.
        limits: size limits for archives, images and answers.
        source_format: "llava", "jsonl" (question/answer rows) or "parquet"; None detects it from the
            file suffix and, for JSON, from the first row (`conversations` means LLaVA).

    Returns:
        The manifest written beside the samples: counts and one `Problem` per unusable row.

    Raises:
        UserError: the upload as a whole is unusable (its `code` says why: unsafe_archive,
            archive_too_large, compression_ratio_too_high, too_many_members, invalid_archive,
            no_dataset_file, ambiguous_dataset_file, invalid_utf8, invalid_json, not_a_list,
            missing_columns, invalid_parquet, no_usable_samples, ...).
    """
    if source_format is not None and source_format not in SOURCE_FORMATS:
        raise UserError(
            f"source_format must be one of {', '.join(SOURCE_FORMATS)}, got {source_format!r}",
            code="invalid_source_format",
            param="source_format",
        )
    if not _DATASET_ID.match(dataset_id):
        # The id becomes a folder name under the store; keep it a plain name.
        raise UserError(f"invalid dataset id {dataset_id!r}", code="invalid_dataset_id", param="dataset_id")
    source = Path(source)
    if not source.exists():
        raise UserError(f"source not found: {source.name}", code="source_not_found")

    tmp: Path | None = None
    try:
        if source.is_dir():
            root = source.resolve()
            data_file = _find_dataset_file(root, source_format)
        elif _suffix(source) in _DATASET_SUFFIXES:
            data_file = source.resolve()
            root = data_file.parent
        else:
            kind = _archive_kind(source)
            tmp_parent = store.path("tmp")
            tmp_parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"ingest-{dataset_id}-", dir=tmp_parent)).resolve()
            if kind == "zip":
                _extract_zip(source, tmp, limits)
            else:
                _extract_tar(source, tmp, limits)
            root = tmp
            data_file = _find_dataset_file(root, source_format)
        return _ingest_file(data_file, root, store, dataset_id, limits, source_format)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Archives


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _archive_kind(path: Path) -> str:
    """'zip' or 'tar', by name first and by content second (uploads may be saved under any name)."""
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(_TAR_SUFFIXES):
        return "tar"
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise UserError(
        f"unsupported source {path.name!r}: expected a .zip, .tar, .tar.gz, a folder, "
        "or a .json/.jsonl/.parquet file",
        code="unsupported_source",
    )


def _member_target(dest: Path, name: str) -> Path:
    """Where an archive member goes; a name that could leave `dest` refuses the whole archive."""
    try:
        return safe_join(dest, name)
    except UserError:
        raise UserError(
            f"archive member {name!r} has an absolute path or '..' (zip slip); archive refused",
            code="unsafe_archive",
        ) from None


def _refuse_too_many(count: int, limits: IngestLimits) -> None:
    if count > limits.max_archive_members:
        raise UserError(
            f"archive has more than {limits.max_archive_members} members", code="too_many_members"
        )


def _refuse_too_large(total: int, limits: IngestLimits, what: str) -> None:
    if total > limits.max_archive_bytes:
        raise UserError(
            f"archive {what} exceeds the limit of {limits.max_archive_bytes} bytes", code="archive_too_large"
        )


def _refuse_ratio(name: str, uncompressed: int, compressed: int, limits: IngestLimits) -> None:
    if uncompressed > _RATIO_FLOOR_BYTES and uncompressed > limits.max_compression_ratio * max(compressed, 1):
        raise UserError(
            f"archive member {name!r} expands {uncompressed / max(compressed, 1):.0f}x "
            f"(limit {limits.max_compression_ratio:g}x); looks like a zip bomb, archive refused",
            code="compression_ratio_too_high",
        )


class _ByteCounter:
    """Counts the bytes really written: archive headers can lie about sizes, the output cannot."""

    def __init__(self, limits: IngestLimits) -> None:
        self.limits = limits
        self.total = 0

    def copy(self, src: IO[bytes], target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as out:
            while chunk := src.read(_COPY_CHUNK):
                self.total += len(chunk)
                _refuse_too_large(self.total, self.limits, "content")
                out.write(chunk)


# Errors the archive libraries raise on corrupt input (OSError covers gzip.BadGzipFile and disk errors
# such as a member file colliding with a member folder).
_ARCHIVE_ERRORS = (
    zipfile.BadZipFile,
    tarfile.TarError,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    OSError,
    NotImplementedError,  # zip compression methods zipfile does not implement
    RuntimeError,  # encrypted zip members
    ValueError,
)


def _extract_zip(archive: Path, dest: Path, limits: IngestLimits) -> None:
    """Check every zip member's header, then extract with the bytes counted."""
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            _refuse_too_many(len(infos), limits)
            declared = 0
            targets: list[tuple[zipfile.ZipInfo, Path]] = []
            for info in infos:
                target = _member_target(dest, info.filename)
                mode = info.external_attr >> 16  # unix mode when the archive was made on unix; else 0
                if stat.S_ISLNK(mode):
                    raise UserError(
                        f"archive member {info.filename!r} is a symlink; archive refused",
                        code="unsafe_archive",
                    )
                # No type bits at all (DOS zips, Python's writestr) means a plain file.
                if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    raise UserError(
                        f"archive member {info.filename!r} is not a regular file; archive refused",
                        code="unsafe_archive",
                    )
                if info.flag_bits & 0x1:
                    raise UserError(f"archive member {info.filename!r} is encrypted", code="invalid_archive")
                declared += info.file_size
                _refuse_ratio(info.filename, info.file_size, info.compress_size, limits)
                targets.append((info, target))
            _refuse_too_large(declared, limits, "declared size")

            counter = _ByteCounter(limits)
            for info, target in targets:
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                # zipfile cuts a member at the size its header declares (and then fails the CRC when the
                # header lied). Let it read to the end of the member's data instead: what the counter's cap
                # sees is the bytes really there, whatever the header says; the CRC still checks them.
                unbounded = copy.copy(info)
                unbounded.file_size = sys.maxsize
                with zf.open(unbounded) as src:
                    counter.copy(src, target)
    except _ARCHIVE_ERRORS as e:
        raise UserError(f"could not read the zip archive: {e}", code="invalid_archive") from None


def _extract_tar(archive: Path, dest: Path, limits: IngestLimits) -> None:
    """Extract a (compressed) tar member by member, checking each header before its data."""
    compressed_size = archive.stat().st_size
    try:
        with tarfile.open(archive, mode="r:*") as tf:
            count = 0
            declared = 0
            counter = _ByteCounter(limits)
            for member in tf:  # reads headers lazily, so a bomb is caught before it is expanded
                count += 1
                _refuse_too_many(count, limits)
                target = _member_target(dest, member.name)
                if member.issym() or member.islnk():
                    raise UserError(
                        f"archive member {member.name!r} is a link; archive refused", code="unsafe_archive"
                    )
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isreg():
                    raise UserError(
                        f"archive member {member.name!r} is a device or special file; archive refused",
                        code="unsafe_archive",
                    )
                declared += member.size
                _refuse_too_large(declared, limits, "declared size")
                # Tar has no per-member compressed size; compare the running total with the whole file.
                _refuse_ratio(member.name, declared, compressed_size, limits)
                src = tf.extractfile(member)
                if src is None:  # pragma: no cover - isreg() members always have data
                    continue
                with src:
                    counter.copy(src, target)
    except _ARCHIVE_ERRORS as e:
        raise UserError(f"could not read the tar archive: {e}", code="invalid_archive") from None


def _find_dataset_file(root: Path, source_format: str | None) -> Path:
    """The single .json/.jsonl/.parquet at the shallowest depth (macOS and dotfile debris ignored)."""
    suffixes = {s for s, formats in _DATASET_SUFFIXES.items() if source_format in (None, *formats)}
    found: list[tuple[int, Path]] = []
    best: int | None = None
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in suffixes:
                found.append((depth, here / name))
                best = depth if best is None else min(best, depth)
        # Nothing below can beat a file already found at this depth or above.
        keep_descending = best is None or depth + 1 <= best
        dirnames[:] = (
            sorted(d for d in dirnames if d != "__MACOSX" and not d.startswith("."))
            if keep_descending
            else []
        )
    if best is None:
        wanted = "/".join(sorted(suffixes))
        raise UserError(f"no dataset file ({wanted}) found in the upload", code="no_dataset_file")
    candidates = [p for d, p in found if d == best]
    if len(candidates) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in candidates)
        raise UserError(
            f"several dataset files at the same level: {names}; keep one (or pass source_format)",
            code="ambiguous_dataset_file",
        )
    return candidates[0]


# --------------------------------------------------------------------------------------------------
# Rows


class _Reject(Exception):
    """One row cannot be used; becomes a `Problem`."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _ingest_file(
    data_file: Path,
    root: Path,
    store: ArtifactStore,
    dataset_id: str,
    limits: IngestLimits,
    source_format: str | None,
) -> Manifest:
    suffix = _suffix(data_file)
    allowed = _DATASET_SUFFIXES[suffix]
    if source_format is not None and source_format not in allowed:
        raise UserError(
            f"source_format {source_format!r} does not match the dataset file {data_file.name!r}",
            code="format_mismatch",
            param="source_format",
        )
    rows: Iterable[tuple[int, Any]]
    if suffix == ".parquet":
        rows = _parquet_rows(data_file)
    elif suffix == ".jsonl":
        rows = _jsonl_rows(data_file)
    else:
        rows = _json_rows(data_file)

    manifest = Manifest(
        dataset_id=dataset_id,
        source_format="parquet" if suffix == ".parquet" else (source_format or "jsonl"),
        num_rows=0,
        num_samples=0,
        num_images=0,
    )
    builder = _RowBuilder(store, limits, folders=_unique([data_file.parent, root]), root=root)
    # write_dataset consumes the samples before it writes the manifest, so the counts this generator
    # keeps in `manifest` are final by then; raising inside it leaves no samples file and no manifest.
    try:
        write_dataset(store, manifest, _samples(rows, builder, manifest, detect=source_format is None))
    except BaseException:
        with contextlib.suppress(OSError):  # only the empty folder write_dataset made, nothing older
            dataset_dir(store, dataset_id).rmdir()
        raise
    return manifest


def _unique(paths: list[Path]) -> list[Path]:
    return list(dict.fromkeys(paths))


def _samples(
    rows: Iterable[tuple[int, Any]], builder: _RowBuilder, manifest: Manifest, *, detect: bool
) -> Iterator[Sample]:
    refs: set[str] = set()
    llava: bool | None = None if detect else manifest.source_format == "llava"
    for row, item in rows:
        manifest.num_rows += 1
        if isinstance(item, Problem):
            manifest.problems.append(item)
            continue
        if manifest.source_format == "parquet":
            row_llava = "conversations" in item and "question" not in item
        else:
            if llava is None and isinstance(item, dict):
                # The first object decides the row schema for the whole file.
                llava = "conversations" in item
                manifest.source_format = "llava" if llava else "jsonl"
            row_llava = bool(llava)
        result = builder.build(row, item, llava=row_llava)
        if isinstance(result, Problem):
            manifest.problems.append(result)
            continue
        manifest.num_samples += 1
        refs.add(result.image)
        manifest.num_images = len(refs)
        yield result
    if manifest.num_samples == 0:
        raise UserError(_no_samples_message(manifest), code="no_usable_samples")


def _no_samples_message(manifest: Manifest) -> str:
    if manifest.num_rows == 0:
        return "the dataset has no rows"
    shown = "; ".join(
        f"row {p.row}" + (f" (id {p.id!r})" if p.id is not None else "") + f": {p.code}: {p.reason}"
        for p in manifest.problems[:_PROBLEMS_IN_MESSAGE]
    )
    more = len(manifest.problems) - _PROBLEMS_IN_MESSAGE
    tail = f"; and {more} more" if more > 0 else ""
    return f"no usable samples in {manifest.num_rows} rows: {shown}{tail}"


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a JSON list. Parsed here, not lazily, so a broken file fails before anything is written."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path.name} is not valid UTF-8 (byte {e.start})", code="invalid_utf8") from None
    del raw
    try:
        data = json.loads(text.removeprefix("\ufeff"))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip("\ufeff \t\r\n").startswith("{"):
            # Several objects one after another: JSON Lines saved as .json.
            return _jsonl_rows(path)
        raise UserError(
            f"{path.name} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", code="invalid_json"
        ) from None
    del text
    if not isinstance(data, list):
        raise UserError(
            f"{path.name} must hold a JSON list of rows, found a JSON {_json_type(data)}",
            code="not_a_list",
        )
    return enumerate(data)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """One row per non-blank line; `row` is the 0-based line number. Decoded per line, so one bad line
    costs one row."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh):
            if lineno == 0:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield (
                    lineno,
                    Problem(
                        lineno, None, "invalid_utf8", f"line {lineno + 1} is not valid UTF-8 (byte {e.start})"
                    ),
                )
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield (
                    lineno,
                    Problem(
                        lineno,
                        None,
                        "invalid_json",
                        f"line {lineno + 1} is not valid JSON: {e.msg} at column {e.colno}",
                    ),
                )


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a `datasets`-written Parquet file, read a batch at a time; the schema is checked now."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path.name} is not a readable Parquet file: {e}", code="invalid_parquet") from None
    names = schema.names
    image_col = "image" if "image" in names else None
    if image_col is None:
        for field in schema:
            if pa.types.is_struct(field.type) and field.type.get_field_index("bytes") >= 0:
                image_col = field.name
                break
    has_text = ("question" in names and "answer" in names) or "conversations" in names
    if image_col is None or not has_text:
        raise UserError(
            f"{path.name} needs an image column and question/answer (or conversations) columns; "
            f"found {', '.join(names)}",
            code="missing_columns",
        )
    columns = [c for c in ("id", image_col, "question", "answer", "conversations", "source") if c in names]

    def rows() -> Iterator[tuple[int, Any]]:
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
                for record in batch.to_pylist():
                    record["image"] = record.pop(image_col)
                    yield row, record
                    row += 1
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"could not read {path.name} at row {row}: {e}", code="invalid_parquet") from None

    return rows()


class _RowBuilder:
    """Turns one source row into a `Sample`, or a `Problem` saying why not."""

    def __init__(
        self, store: ArtifactStore, limits: IngestLimits, *, folders: list[Path], root: Path
    ) -> None:
        self.store = store
        self.limits = limits
        self.folders = folders
        self.root = root
        self.seen_ids: dict[str, int] = {}
        # Source image (path or content hash) -> stored (ref, width, height) or the reason it failed:
        # a file shared by many rows is decoded once. Only small tuples, never pixels.
        self.images: dict[str, tuple[str, int, int] | _Reject] = {}

    def build(self, row: int, item: Any, *, llava: bool) -> Sample | Problem:
        if not isinstance(item, dict):
            return Problem(row, None, "invalid_row", f"row is a JSON {_json_type(item)}, not an object")
        raw_id = item.get("id")
        if raw_id is None:
            sample_id = str(row)
        elif isinstance(raw_id, str | int) and not isinstance(raw_id, bool):
            sample_id = str(raw_id)
        else:
            return Problem(row, None, "invalid_row", f"id must be a string or integer, got {raw_id!r}")
        try:
            first = self.seen_ids.get(sample_id)
            if first is not None:
                raise _Reject("duplicate_id", f"id {sample_id!r} already used by row {first}")
            self.seen_ids[sample_id] = row
            question, answer = self._text(item, llava=llava)
            source = _source(item)
            ref, width, height = self._image(item)
        except _Reject as r:
            return Problem(row, sample_id, r.code, r.reason)
        return Sample(
            id=sample_id, image=ref, width=width, height=height, question=question, answer=answer, source=source
        )

    # Text is checked before the image so rows that are skipped anyway cost no decoding.
    def _text(self, item: dict, *, llava: bool) -> tuple[str, str]:
        if llava:
            question, answer = _first_turn(item)
        else:
            question, answer = item.get("question"), item.get("answer")
        for name, value in (("question", question), ("answer", answer)):
            if value is not None and not isinstance(value, str):
                raise _Reject("invalid_row", f"{name} must be a string, got {type(value).__name__}")
        question = _IMAGE_TOKEN.sub("", question or "").strip()
        answer = (answer or "").strip()
        if not question:
            raise _Reject("missing_question", "no question" + (" (no human turn)" if llava else ""))
        if not answer:
            raise _Reject("empty_answer", "the answer is missing or blank")
        if len(answer) >= self.limits.max_answer_chars:
            raise _Reject(
                "answer_too_long", f"skipped ({len(answer)} chars >= {self.limits.max_answer_chars})"
            )
        return question, answer

    def _image(self, item: dict) -> tuple[str, int, int]:
        value = item.get("image")
        if isinstance(value, dict):  # a `datasets` Image cell: {"bytes", "path"}
            data, value = value.get("bytes"), value.get("path")
            if data:
                if not isinstance(data, bytes | bytearray):
                    raise _Reject("invalid_row", "image bytes are not binary")
                return self._cached("sha256:" + hashlib.sha256(data).hexdigest(), bytes(data))
        elif isinstance(value, bytes | bytearray) and value:
            return self._cached("sha256:" + hashlib.sha256(value).hexdigest(), bytes(value))
        if value is None or value == "" or value == b"":
            raise _Reject("missing_image", "the row has no image")
        if isinstance(value, list):
            raise _Reject("invalid_row", "image must be one path (multi-image rows are not supported)")
        if not isinstance(value, str):
            raise _Reject("invalid_row", f"image must be a path, got {type(value).__name__}")
        return self._cached_path(value)

    def _cached_path(self, rel: str) -> tuple[str, int, int]:
        path = self._resolve(rel)
        return self._cached("path:" + str(path), path)

    def _resolve(self, rel: str) -> Path:
        for folder in self.folders:
            try:
                path = safe_join(folder, rel, param="image")
            except UserError:
                raise _Reject("unsafe_path", f"image path {rel!r} leaves the dataset folder") from None
            # safe_join keeps the path inside `folder`; the root is the outer bound for both.
            if path.is_file() and path.is_relative_to(self.root):
                return path
        raise _Reject("image_not_found", f"image file {rel!r} not found")

    def _cached(self, key: str, src: Path | bytes) -> tuple[str, int, int]:
        hit = self.images.get(key)
        if hit is None:
            try:
                data, width, height = _normalise_image(src, self.limits.max_image_pixels)
                hit = (self.store.put_image_bytes(data), width, height)
            except _Reject as r:
                hit = r
            self.images[key] = hit
        if isinstance(hit, _Reject):
            raise _Reject(hit.code, hit.reason)
        return hit


def _source(item: dict) -> str | None:
    """The sample's subset: its `source` column, else the first folder of its image path (LLaVA-665k's
    `coco/train2017/...`, `gqa/images/...`, `ocr_vqa/...`); None when neither says."""
    value = item.get("source")
    if value is not None:
        if not isinstance(value, str) or not value.strip() or len(value) > 200:
            raise _Reject("invalid_row", "source must be a non-empty string of at most 200 characters")
        return value.strip()
    path = item.get("image")
    if isinstance(path, dict):
        path = path.get("path")
    if isinstance(path, str):
        parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
        if len(parts) > 1:
            return parts[0]
    return None


def _first_turn(item: dict) -> tuple[Any, Any]:
    """The first human turn and the gpt turn after it (the official code uses only this pair)."""
    conversations = item.get("conversations")
    if conversations is None:
        return None, None
    if not isinstance(conversations, list):
        raise _Reject("invalid_row", "conversations must be a list")
    question = answer = None
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise _Reject("invalid_row", f"conversation turn {i} is not an object")
        if turn.get("from") in _HUMAN:
            question = turn.get("value")
            for later in conversations[i + 1 :]:
                if isinstance(later, dict) and later.get("from") in _GPT:
                    answer = later.get("value")
                    break
            break
    return question, answer


# --------------------------------------------------------------------------------------------------
# Images


def _normalise_image(src: Path | bytes, max_pixels: int) -> tuple[bytes, int, int]:
    """Decode fully and return (bytes to store, width, height) after EXIF orientation.

    An RGB JPEG that needs no rotation is stored as its original bytes (no re-encoding loss); anything
    else is converted to RGB and stored as PNG, so every stored image decodes to RGB.
    """
    with warnings.catch_warnings():
        # We enforce our own pixel limit below; PIL's warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(src if isinstance(src, Path) else io.BytesIO(src))
        except Image.DecompressionBombError as e:
            raise _Reject("image_too_large", str(e)) from None
        except Exception as e:  # PIL plugins raise many exception types on hostile input
            raise _Reject("unreadable_image", f"not a readable image: {e}") from None
        with im:
            width, height = im.size
            # The header is all Image.open has read: refuse before any pixel is decoded.
            if width * height > max_pixels:
                raise _Reject(
                    "image_too_large", f"{width}x{height} = {width * height} pixels > limit {max_pixels}"
                )
            try:
                im.load()  # decode everything now: a truncated file fails here, not in a later stage
            except Image.DecompressionBombError as e:
                raise _Reject("image_too_large", str(e)) from None
            except Exception as e:
                raise _Reject("unreadable_image", f"image could not be decoded: {e}") from None
            orientation = _orientation(im)
            # MPO is what PIL calls a camera JPEG with extra frames; its bytes are a valid JPEG.
            if im.format in ("JPEG", "MPO") and im.mode == "RGB" and orientation == 1:
                return (src.read_bytes() if isinstance(src, Path) else src), width, height
            try:
                oriented = ImageOps.exif_transpose(im) if orientation != 1 else im
                rgb = _to_rgb(oriented)
                buf = io.BytesIO()
                rgb.save(buf, format="PNG")
            except Exception as e:
                raise _Reject("unreadable_image", f"image could not be converted to RGB: {e}") from None
            return buf.getvalue(), rgb.width, rgb.height


def _orientation(im: Image.Image) -> int:
    """EXIF orientation, 1 when absent or unreadable (broken EXIF should not cost the image)."""
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB with the colours a viewer would show: transparency over white, 16-bit scaled, not clipped."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in _SIXTEEN_BIT_MODES:
        # PIL's own I;16 -> L conversion clips at 255; scale the 0..65535 range instead.
        values = np.asarray(im).astype(np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        # Palette/grey/RGB transparency becomes a real alpha channel, then sits on white (a plain
        # convert("RGB") would show transparent pixels as whatever colour they hide, often black).
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # 1, L, P, CMYK, YCbCr, ...
