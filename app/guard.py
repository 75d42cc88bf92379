"""A small ASGI middleware in front of the app: what a request may cost before anything looks at it.

FastAPI reads and parses a JSON body before any dependency runs, so the API-key check of a route
(`app.deps.CurrentKey`) comes too late to protect memory: here a request that carries a body is refused
(401) on its `Authorization` header alone, before a byte of the body is read. Bodies are then counted as
they arrive: a JSON body over `max_json_body_bytes` (an upload over `max_upload_bytes`) is refused with
413, from its `Content-Length` when it declares one, else once that many bytes came. A body that stops
arriving for `body_idle_timeout_s` (a slow client, or a `Content-Length` larger than what is sent) ends
with 408, and the server closes the connection: nobody holds one for ever.

The refusals raised while the app reads the body are `HTTPException`s, which FastAPI passes on untouched
to the error handlers (the envelope); an upload being streamed to disk removes its file on the way out
(`app.uploads`).
"""

from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import AuthenticationError, envelope
from core import records
from core.settings import Settings

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_UPLOAD_OVERHEAD = 64 * 1024  # multipart boundaries and the small fields besides the file


def check_key(owners: tuple[str, ...], authorization: str | None) -> str:
    """The owner (sha256 of the key) of a `Bearer <key>` header, compared in constant time against every
    known key. Raises AuthenticationError (401) for no key or an unknown one."""
    import hmac

    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise AuthenticationError(
            "no API key: send `Authorization: Bearer <key>`", code="missing_api_key", param="Authorization"
        )
    owner = records.owner_of(credentials.strip())
    # How long the check takes says nothing about how close a guess was, nor which key matched.
    matched = False
    for known in owners:
        matched |= hmac.compare_digest(owner, known)
    if not matched:
        raise AuthenticationError("invalid API key", code="invalid_api_key", param="Authorization")
    return owner


class RequestGuard:
    """Auth before the body, body size limits, and an idle timeout on reading the body (see the module doc)."""

    def __init__(self, app: ASGIApp, settings: Settings, owners: tuple[str, ...]) -> None:
        self.app = app
        self.settings = settings
        self.owners = owners

    def _limit(self, scope: Scope) -> tuple[int, str]:
        headers = dict(scope.get("headers") or ())
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if content_type == b"multipart/form-data":
            return self.settings.max_upload_bytes + _UPLOAD_OVERHEAD, "upload"
        return self.settings.max_json_body_bytes, "body"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        if scope["method"] in _BODY_METHODS and scope["path"].startswith("/v1/"):
            try:
                check_key(self.owners, headers.get(b"authorization", b"").decode("latin-1"))
            except AuthenticationError as exc:
                response = envelope(exc.status_code, headers={"WWW-Authenticate": "Bearer"}, **exc.to_dict())  # type: ignore[arg-type]
                await response(scope, receive, send)
                return
        limit, what = self._limit(scope)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            code = "upload_too_large" if what == "upload" else "body_too_large"
            response = envelope(413, type="invalid_request_error", code=code, message=f"the {what} is larger than {limit} bytes")
            await response(scope, receive, send)
            return
        await self.app(scope, self._receiver(receive, limit, what), send)

    def _receiver(self, receive: Receive, limit: int, what: str) -> Receive:
        timeout = self.settings.body_idle_timeout_s
        received = 0
        done = False

        async def guarded() -> Message:
            nonlocal received, done
            if done:
                return await receive()  # after the body: only http.disconnect is left to wait for
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except TimeoutError:
                raise HTTPException(408, f"the request body stopped arriving for {timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, f"the {what} is larger than {limit} bytes")
                done = not message.get("more_body", False)
            return message

        return guarded
