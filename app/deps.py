"""Dependencies as `Annotated` aliases, so a route's signature reads like its docstring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis import Redis

from app.guard import check_key
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
    # `credentials` is only there for the OpenAPI document; the header is read the way the guard reads it.
    return ApiKey(owner=check_key(request.app.state.owners, request.headers.get("authorization")))


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
