"""Viewer sessions: an API key exchanged for a server-side session in Redis, and CSRF tokens.

The browser never keeps the API key: signing in checks it once and stores, under the sha256 of a random
session token, the key's owner id (what records hold) and the session's CSRF token, with an expiry. The
cookie holds only the session token: HttpOnly (no script reads it), SameSite=Strict (no other site's page
sends it), Secure over HTTPS, path `/ui`. Signing out deletes the Redis entry, so a copied cookie is dead
too. Every state-changing form carries the session's CSRF token (compared in constant time) and is refused
when the request's Origin is another site's; the sign-in form, which has no session yet, uses a
double-submit token (a cookie and a form field that must match).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

from fastapi import Request
from redis import Redis

from core import records

COOKIE = "miadpo_session"
SIGNIN_COOKIE = "miadpo_signin"
COOKIE_PATH = "/ui"


@dataclass(frozen=True)
class Session:
    token_hash: str
    owner: str
    csrf: str


def _key(token: str) -> str:
    return f"{records.PREFIX}session:{hashlib.sha256(token.encode()).hexdigest()}"


def known_owner(request: Request, api_key: str) -> str | None:
    """The owner id of `api_key` if the server accepts it (constant time over every known key), else None."""
    owner = records.owner_of(api_key)
    matched = False
    for known in request.app.state.owners:
        matched |= hmac.compare_digest(owner, known)
    return owner if matched else None


def create(redis: Redis, owner: str, ttl_s: int) -> str:
    """A new session for `owner`; returns the token that goes in the cookie."""
    token = secrets.token_urlsafe(32)
    redis.set(_key(token), json.dumps({"owner": owner, "csrf": secrets.token_urlsafe(32)}), ex=ttl_s)
    return token


def lookup(redis: Redis, token: str | None) -> Session | None:
    """The live session of a cookie token, or None (no cookie, expired, signed out)."""
    if not token or len(token) > 128:
        return None
    key = _key(token)
    raw = redis.get(key)
    if raw is None:
        return None
    data = json.loads(raw)
    return Session(token_hash=key, owner=data["owner"], csrf=data["csrf"])


def destroy(redis: Redis, session: Session) -> None:
    redis.delete(session.token_hash)


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another origin (Origin, else Referer)."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return source != "null"  # no header: a non-browser client or a privacy setting; "null": sandboxed, refuse
    host = request.headers.get("host", "")
    rest = source.split("://", 1)[-1]
    return rest.split("/", 1)[0] == host


def csrf_ok(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of the viewer, never another site (`//evil`, `https://...`)."""
    if target and target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/"
