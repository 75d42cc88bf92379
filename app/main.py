"""The FastAPI app: `create_app()` wires settings, Redis, the store, errors, metrics and the routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI
from redis import Redis

from app import viewer
from app.errors import install_error_handlers
from app.guard import RequestGuard
from app.metrics import Metrics, MetricsMiddleware
from app.openapi import install as install_openapi
from app.routes import datasets, evaluations, health, pairsets, trainings
from app.uploads import sweep_incoming
from core import records
from core.settings import Settings, get_settings
from core.store import ArtifactStore

log = logging.getLogger(__name__)

DESCRIPTION = (
    "MIA-DPO as a service: upload single-image instruction data, get multi-image DPO preference pairs "
    "(and LoRA adapters) out. Every `/v1` call needs `Authorization: Bearer <api key>`; resources belong "
    'to the key that created them. Errors are `{"error": {"type", "code", "message", "param"}}`.'
)


def _version() -> str:
    try:
        return version("miadpo")
    except PackageNotFoundError:
        return "0.0.0"


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API app for `settings` (default: the process settings from the environment)."""
    settings = settings or get_settings()
    redis = Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        redis.close()

    app = FastAPI(title="miadpo", version=_version(), description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.redis = redis
    app.state.store = ArtifactStore(settings.data_dir)
    app.state.owners = tuple(records.owner_of(k) for k in settings.api_keys)
    app.state.metrics = Metrics(redis)
    if not settings.api_keys:
        log.warning("MIADPO_API_KEYS is empty: every /v1 call will be refused with 401")

    install_error_handlers(app)
    # The guard inside the metrics: its refusals (401, 413 before the body) are counted too.
    app.add_middleware(RequestGuard, settings=settings, owners=app.state.owners)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    sweep_incoming(app.state.store)
    app.include_router(health.router)
    app.include_router(datasets.router)
    app.include_router(pairsets.router)
    app.include_router(trainings.router)
    app.include_router(evaluations.router)
    viewer.install(app)  # the web viewer under /ui/ (not in the OpenAPI document)
    install_openapi(app)  # last: the document covers every route
    return app
