"""The one mapping from errors to the envelope `{"error": {"type", "code", "message", "param"}}`.

Every error a client can see goes through here: the project's own errors (`core.errors`), FastAPI's
request validation (422, `param` = the field path), Starlette's routing errors (404, 405), Redis being
unreachable (503) and anything unexpected (500, logged with its traceback, never shown).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from core.errors import MiadpoError, UserError

log = logging.getLogger(__name__)

_HTTP_TYPES = {401: "authentication_error", 404: "not_found_error", 409: "conflict_error"}
_HTTP_CODES = {
    400: "invalid_body",
    408: "body_timeout",
    404: "route_not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}
_LOC_SOURCES = ("body", "query", "path", "header", "cookie")
_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


class AuthenticationError(MiadpoError):
    """No API key, or one we do not know."""

    status_code = 401
    type = "authentication_error"


class RequestTooLargeError(UserError):
    """An upload over `max_upload_bytes`."""

    status_code = 413


def envelope(
    status_code: int,
    *,
    type: str,
    code: str | None,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"type": type, "code": code, "message": message, "param": param}}
    return JSONResponse(body, status_code=status_code, headers=headers)


def _param(loc: Any) -> str | None:
    """`("body", "augmentation", "num")` -> "augmentation.num"; a header keeps its name."""
    parts = list(loc)
    if parts and parts[0] in _LOC_SOURCES:
        parts = parts[1:]
    return ".".join(str(p) for p in parts) or None


async def _miadpo_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MiadpoError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    return envelope(exc.status_code, headers=headers, **exc.to_dict())  # type: ignore[arg-type]


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
    messages = []
    for err in errors[:5]:
        where = _param(err.get("loc", ()))
        messages.append(f"{where}: {err['msg']}" if where else str(err["msg"]))
    if first.get("type") == "json_invalid":
        return envelope(422, type="invalid_request_error", code="invalid_json", message="the body is not valid JSON")
    return envelope(
        422,
        type="invalid_request_error",
        code=str(first.get("type", "invalid")),
        message="; ".join(messages),
        param=_param(first.get("loc", ())),
    )


def _allowed_methods(request: Request) -> str:
    """Every method the API documents on this path: Starlette's 405 names only the first matching route's
    (GET and DELETE of /v1/datasets/{id} are two routes)."""
    methods: set[str] = set()
    for template, item in request.app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\{[^/}]+\}", "[^/]+", template), request.url.path):
            methods |= {m.upper() for m in item if m in _HTTP_METHODS}
    return ", ".join(sorted(methods))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    headers = dict(exc.headers) if exc.headers else {}
    if status == 404:
        message = f"no route {request.method} {request.url.path}"
    elif status == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
        headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
    else:
        message = str(exc.detail)
    return envelope(
        status,
        type=_HTTP_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
        code=_HTTP_CODES.get(status, "http_error"),
        message=message,
        headers=headers or None,
    )


async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("redis error on %s %s: %r", request.method, request.url.path, exc)
    return envelope(
        503,
        type="transient_error",
        code="redis_unavailable",
        message="job state is unreachable for the moment; retry later",
        headers={"Retry-After": "5"},
    )


async def _client_gone(request: Request, exc: Exception) -> Response:
    """The client went away mid-request (an upload dropped half-way): nothing to answer and nothing broken
    here, so no 500 in the metrics; 499 as nginx logs it."""
    log.info("client disconnected during %s %s", request.method, request.url.path)
    return Response(status_code=499)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return envelope(500, type="server_error", code="internal_error", message="internal server error")


def install_error_handlers(app: FastAPI) -> None:
    """Route every error to the envelope."""
    app.add_exception_handler(MiadpoError, _miadpo_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RedisError, _redis_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _unexpected_error)
