"""File downloads (pair-set exports, adapters, checkpoints): a .tar.gz served from the store, with `Range`.

Starlette's FileResponse answers `Range` requests (206 with Content-Range, 416 outside the file) and
sends Content-Length and an ETag, so an interrupted download of a large adapter resumes where it stopped.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import FileResponse

BINARY = {"schema": {"type": "string", "format": "binary"}}
# A route whose response class is not JSON would declare its errors in that media type: name JSON here.
JSON_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for code in (401, 404, 409, 422)
}


class ArchiveResponse(FileResponse):
    media_type = "application/gzip"


def archive_responses(description: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI responses of a route serving a .tar.gz (`description`: what the 200 holds)."""
    return {
        200: {"description": description, "content": {"application/gzip": BINARY}},
        206: {"description": "The bytes asked for with `Range`.", "content": {"application/gzip": BINARY}},
        416: {"description": "The `Range` asked for lies outside the archive.", "content": {"text/plain": {"schema": {"type": "string"}}}},
        **JSON_ERRORS,
    }
