"""Receiving a dataset upload: the multipart body streamed straight into the artifact store.

Starlette's own form parsing spools a file to the system temp dir before a route sees it, so an upload
would be copied twice and the size limit checked only at the end. Here the body is parsed as it arrives
(python-multipart), the file part goes in chunks to `uploads/.incoming/` under the store, and the upload
is refused with 413 the moment it passes `max_upload_bytes`; the partial file is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated

from anyio import to_thread
from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.deps import CurrentKey, SettingsDep, StoreDep
from app.errors import RequestTooLargeError
from core.errors import UserError
from core.settings import Settings
from core.store import ArtifactStore

log = logging.getLogger(__name__)

FILE_FIELD = "file"
INCOMING = ("uploads", ".incoming")
_FLUSH_BYTES = 1 << 20  # write to disk (in a thread) once this much is buffered
_MAX_FIELD_BYTES = 64 * 1024
_MAX_PARTS = 16
_MULTIPART_OVERHEAD = 64 * 1024  # boundaries and the other fields, beyond the file itself
# The only suffixes kept from a client's file name (ingestion detects the format from them).
_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".txz", ".tar", ".zip", ".jsonl", ".json", ".parquet")


@dataclass
class Upload:
    """A received upload: the file under the store's incoming folder, and the other form fields."""

    path: Path | None = None
    filename: str | None = None
    size: int = 0
    sha256: str = ""
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def suffix(self) -> str:
        """The file name's suffix if it is one we know, else "" (the client's name never reaches the disk)."""
        name = (self.filename or "").lower()
        return next((s for s in _SUFFIXES if name.endswith(s)), "")

    def move_to(self, store: ArtifactStore, dataset_id: str) -> str:
        """Move the file to `uploads/{dataset_id}/upload{suffix}`; return that path relative to the store."""
        assert self.path is not None
        rel = f"uploads/{dataset_id}/upload{self.suffix}"
        dest = store.path(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, dest)
        self.path = dest
        return rel

    def discard(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    @contextlib.contextmanager
    def discarded_on_error(self) -> Iterator[None]:
        """Remove the file if the block raises: a refused upload leaves nothing on disk."""
        try:
            yield
        except BaseException:
            self.discard()
            raise


class _Receiver:
    """python-multipart callbacks: collect small fields, stream the one file part to disk."""

    def __init__(self, incoming: Path, max_bytes: int) -> None:
        self.upload = Upload()
        self.incoming = incoming
        self.max_bytes = max_bytes
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.fh: IO[bytes] | None = None
        self.digest = hashlib.sha256()
        self._parts = 0
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name: str | None = None
        self._is_file = False
        self._data = bytearray()

    def on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > _MAX_PARTS:
            raise UserError(f"too many form parts (at most {_MAX_PARTS})", code="too_many_parts")
        self._disposition, self._name, self._is_file, self._data = b"", None, False, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise UserError("a form part has no name", code="invalid_multipart")
        self._name = options[b"name"].decode("utf-8", "replace")
        self._is_file = self._name == FILE_FIELD
        if self._is_file:
            if self.upload.path is not None:
                raise UserError("send one `file` part only", code="invalid_multipart", param=FILE_FIELD)
            raw_name = options.get(b"filename")
            self.upload.filename = raw_name.decode("utf-8", "replace") if raw_name else None
            self.incoming.mkdir(parents=True, exist_ok=True)
            self.upload.path = self.incoming / secrets.token_hex(16)
            self.fh = open(self.upload.path, "wb")  # noqa: SIM115 - closed in receive_upload

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._is_file:
            self.upload.size += len(chunk)
            if self.upload.size > self.max_bytes:
                raise RequestTooLargeError(
                    f"upload is larger than {self.max_bytes} bytes", code="upload_too_large", param=FILE_FIELD
                )
            self.digest.update(chunk)
            self.pending.append(bytes(chunk))
            self.pending_bytes += len(chunk)
        else:
            self._data += chunk
            if len(self._data) > _MAX_FIELD_BYTES:
                raise UserError(f"form field {self._name!r} is too long", code="field_too_long", param=self._name)

    def on_part_end(self) -> None:
        if not self._is_file and self._name is not None:
            self.upload.fields[self._name] = self._data.decode("utf-8", "replace")

    def take_pending(self) -> bytes:
        data = b"".join(self.pending)
        self.pending.clear()
        self.pending_bytes = 0
        return data


async def receive_upload(request: Request, key: CurrentKey, settings: SettingsDep, store: StoreDep) -> AsyncIterator[Upload]:
    """Stream a multipart/form-data body into the store; the `file` part is required.

    Depends on `CurrentKey` so that nobody without a key gets to write a byte to disk. A dependency with
    `yield`: whatever happens after the body was received (a header refused by validation, an error in
    the route, a replayed idempotent request), a file still in `.incoming` is removed on the way out.
    """
    upload = await _receive(request, settings, store)
    incoming = store.path(*INCOMING)
    try:
        yield upload
    finally:
        if upload.path is not None and upload.path.parent == incoming:
            upload.discard()


def sweep_incoming(store: ArtifactStore, older_than_s: float = 3600) -> int:
    """Remove what a crashed API process left in `uploads/.incoming` (files untouched for `older_than_s`,
    so that another API process's upload in progress stays); the count removed."""
    folder = store.path(*INCOMING)
    removed = 0
    if not folder.is_dir():
        return 0
    cutoff = time.time() - older_than_s
    for path in folder.iterdir():
        with contextlib.suppress(OSError):
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
    if removed:
        log.warning("removed %d abandoned upload(s) from %s", removed, folder)
    return removed


async def _receive(request: Request, settings: Settings, store: ArtifactStore) -> Upload:
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise UserError("send the dataset as multipart/form-data with a `file` part", code="multipart_required", param=FILE_FIELD)
    max_bytes = settings.max_upload_bytes
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes + _MULTIPART_OVERHEAD:
        raise RequestTooLargeError(f"upload is larger than {max_bytes} bytes", code="upload_too_large", param=FILE_FIELD)

    receiver = _Receiver(store.path(*INCOMING), max_bytes)
    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": receiver.on_part_begin,
            "on_part_data": receiver.on_part_data,
            "on_part_end": receiver.on_part_end,
            "on_header_field": receiver.on_header_field,
            "on_header_value": receiver.on_header_value,
            "on_header_end": receiver.on_header_end,
            "on_headers_finished": receiver.on_headers_finished,
        },
    )
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if receiver.fh is not None and receiver.pending_bytes >= _FLUSH_BYTES:
                await to_thread.run_sync(receiver.fh.write, receiver.take_pending())
        parser.finalize()
        if receiver.fh is not None:
            fh = receiver.fh
            await to_thread.run_sync(fh.write, receiver.take_pending())
            await to_thread.run_sync(fh.close)
    except BaseException as exc:
        if receiver.fh is not None:
            receiver.fh.close()
        receiver.upload.discard()
        if isinstance(exc, FormParserError):
            raise UserError(f"malformed multipart body: {exc}", code="invalid_multipart") from None
        raise
    if receiver.upload.path is None:
        raise RequestValidationError([{"type": "missing", "loc": ("body", FILE_FIELD), "msg": "Field required"}])
    receiver.upload.sha256 = receiver.digest.hexdigest()
    return receiver.upload


UploadDep = Annotated[Upload, Depends(receive_upload)]
