"""Liveness, readiness and Prometheus metrics (no API key: probes and scrapers have none)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from fastapi import APIRouter, Request, Response

from app.deps import RedisDep, StoreDep
from app.metrics import CONTENT_TYPE
from app.schemas import ErrorResponse, Status
from core.errors import TransientError

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Status)
def healthz() -> dict[str, Any]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Status, responses={503: {"model": ErrorResponse}})
def readyz(redis: RedisDep, store: StoreDep) -> dict[str, Any]:
    """Redis answers and the artifact store is writable."""
    try:
        redis.ping()
    except Exception as exc:
        raise TransientError(f"redis does not answer: {type(exc).__name__}", code="redis_unavailable") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".readyz-", dir=store.root)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise TransientError(f"artifact store is not writable: {exc.strerror}", code="store_unwritable") from None
    return {"status": "ready"}


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}, "description": "Prometheus text format."}},
)
def metrics(request: Request) -> Response:
    """Prometheus metrics: requests by route and status, latency, jobs per queue and state."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
