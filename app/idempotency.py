"""`Idempotency-Key` on create calls: a repeated key (per API key) gets the first response again.

The first request claims the key in Redis; a repeat with the same request body gets the stored response
(and the header `Idempotent-Replayed: true`), a repeat with a different body gets 409, and so does a
repeat that arrives while the first is still running. A failed first request releases the key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from fastapi import Response
from redis import Redis

from core import records
from core.settings import Settings


def fingerprint(*parts: Any) -> str:
    """A stable digest of what makes two requests the same request."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def run_once(
    redis: Redis,
    settings: Settings,
    *,
    owner: str,
    key: str | None,
    request_fingerprint: str,
    response: Response,
    create: Callable[[], dict[str, Any]],
    on_replay: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """`create()` once per (owner, key); without a key, every call creates."""
    if key is None:
        return create()
    stored = records.idempotency_begin(redis, owner, key, request_fingerprint)
    if stored is not None:
        if on_replay is not None:
            on_replay()
        response.headers["Idempotent-Replayed"] = "true"
        return stored["body"]
    try:
        body = create()
    except BaseException:
        records.idempotency_release(redis, owner, key)
        raise
    records.idempotency_save(
        redis, owner, key, request_fingerprint, status_code=201, body=body, ttl_s=settings.idempotency_ttl_s
    )
    return body
