"""Idempotency keys: the first response to a create call, per API key."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from redis import Redis

from core.errors import ConflictError
from core.records.base import (
    _IDEMPOTENCY_CLAIM_TTL_S,
    PREFIX,
    Record,
    _dump,
)


def _idem_key(owner: str, key: str) -> str:
    return f"{PREFIX}idem:{owner}:{hashlib.sha256(key.encode('utf-8')).hexdigest()}"


def idempotency_begin(r: Redis, owner: str, key: str, fingerprint: str) -> Record | None:
    """Claim an Idempotency-Key for a request, or return the stored first response {status_code, body}.

    ConflictError when the key was used with a different request, or its first request is still running.
    """
    rkey = _idem_key(owner, key)
    claim = _dump({"state": "pending", "fingerprint": fingerprint})
    if r.set(rkey, claim, nx=True, ex=_IDEMPOTENCY_CLAIM_TTL_S):
        return None
    raw = r.get(rkey)
    if raw is None:  # the claim just expired: try once more
        return idempotency_begin(r, owner, key, fingerprint)
    stored = json.loads(raw)
    if stored["fingerprint"] != fingerprint:
        raise ConflictError(
            "Idempotency-Key was already used with a different request",
            code="idempotency_key_reused",
            param="Idempotency-Key",
        )
    if stored["state"] == "pending":
        raise ConflictError(
            "a request with this Idempotency-Key is still in progress",
            code="idempotency_key_in_progress",
            param="Idempotency-Key",
        )
    return {"status_code": stored["status_code"], "body": stored["body"]}


def idempotency_save(
    r: Redis, owner: str, key: str, fingerprint: str, *, status_code: int, body: Any, ttl_s: int
) -> None:
    """Remember the first response to an Idempotency-Key for `ttl_s` seconds."""
    value = {"state": "done", "fingerprint": fingerprint, "status_code": status_code, "body": body}
    r.set(_idem_key(owner, key), _dump(value), ex=ttl_s)


def idempotency_release(r: Redis, owner: str, key: str) -> None:
    """Forget a claim whose request failed, so that the client may retry with the same key."""
    r.delete(_idem_key(owner, key))
