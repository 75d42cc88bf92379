"""File downloads (pair-set exports, adapters, checkpoints): a .tar.gz served from the store, with `Range`.

Starlette's FileResponse answers `Range` requests (206 with Content-Range, 416 outside the file) and
sends Content-Length and an ETag, so an interrupted download of a large adapter resumes where it stopped.
"""

from __future__ import annotations

import os
from typing import Any

import anyio
from fastapi.responses import FileResponse
from starlette.datastructures import Headers
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from app.errors import envelope

BINARY = {"schema": {"type": "string", "format": "binary"}}
# A route whose response class is not JSON would declare its errors in that media type: name JSON here.
JSON_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for code in (401, 404, 409, 422)
}


class ArchiveResponse(FileResponse):
    """A FileResponse whose Range errors follow the API: a malformed `Range` is ignored (the whole file, as
    RFC 9110 14.2 allows), one outside the file is a 416 with the error envelope and `Content-Range`."""

    media_type = "application/gzip"

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader:
            return []  # no ranges: the whole file

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        http_range = Headers(scope=scope).get("range")
        if http_range is not None and scope["method"].upper() in ("GET", "HEAD"):
            stat = self.stat_result if self.stat_result is not None else await anyio.to_thread.run_sync(os.stat, self.path)
            size = stat.st_size
            try:
                self._parse_range_header(http_range, size)
            except RangeNotSatisfiable:
                response = envelope(
                    416,
                    type="invalid_request_error",
                    code="range_not_satisfiable",
                    message=f"the range {http_range[:100]!r} lies outside the archive ({size} bytes)",
                    param="Range",
                    headers={"Content-Range": f"bytes */{size}"},
                )
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def archive_responses(description: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI responses of a route serving a .tar.gz (`description`: what the 200 holds)."""
    return {
        200: {"description": description, "content": {"application/gzip": BINARY}},
        206: {"description": "The bytes asked for with `Range`.", "content": {"application/gzip": BINARY}},
        416: {
            "description": "The `Range` asked for lies outside the archive (a malformed `Range` is ignored: 200).",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
        },
        **JSON_ERRORS,
    }
