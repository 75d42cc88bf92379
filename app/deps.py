"""Dependencies as `Annotated` aliases, so a route's signature reads like its docstring."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis import Redis

from app.errors import AuthenticationError
from core import records
from core.settings import Settings
from core.store import ArtifactStore


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _redis(request: Request) -> Redis:
    return request.app.state.redis


def _store(request: Request) -> ArtifactStore:
    return request.app.state.store


SettingsDep = Annotated[Settings, Depends(_settings)]
RedisDep = Annotated[Redis, Depends(_redis)]
StoreDep = Annotated[ArtifactStore, Depends(_store)]


@dataclass(frozen=True)
class ApiKey:
    """The caller, as records know it: the sha256 of its API key."""

    owner: str


_bearer = HTTPBearer(auto_error=False, description="An API key from MIADPO_API_KEYS.")


def _current_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> ApiKey:
    if credentials is None:
        raise AuthenticationError(
            "no API key: send `Authorization: Bearer <key>`", code="missing_api_key", param="Authorization"
        )
    owner = records.owner_of(credentials.credentials)
    # Compare digests, in constant time, against every known key: how long the check takes says nothing
    # about how close a guess was, nor which key matched.
    matched = False
    for known in request.app.state.owners:
        matched |= hmac.compare_digest(owner, known)
    if not matched:
        raise AuthenticationError("invalid API key", code="invalid_api_key", param="Authorization")
    return ApiKey(owner=owner)


CurrentKey = Annotated[ApiKey, Depends(_current_key)]

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Repeat a create call safely: the same key (per API key) returns the first result.",
    ),
]


@dataclass(frozen=True)
class Page:
    """List parameters: at most `limit` items after the id `after`, newest first."""

    limit: int
    after: str | None


def _page(
    limit: Annotated[int, Query(ge=1, le=100, description="Items per page.")] = 20,
    after: Annotated[
        str | None,
        Query(min_length=1, max_length=64, pattern=r"^[a-z]{2}_[0-9a-z]+$", description="Cursor: the last id of the previous page."),
    ] = None,
) -> Page:
    return Page(limit=limit, after=after)


PageDep = Annotated[Page, Depends(_page)]
