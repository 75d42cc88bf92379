"""Pair sets: start the pipeline on a ready dataset, follow it, cancel it (DESIGN 3.1)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Header, Path, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from redis import Redis

from app.deps import CurrentKey, IdempotencyKey, PageDep, RedisDep, SettingsDep
from app.idempotency import fingerprint, run_once
from app.schemas import ErrorResponse, EventList, PairSet, PairSetCreate, PairSetList
from core import jobs, records
from core.errors import ConflictError, NotFoundError
from core.settings import Settings

router = APIRouter(
    prefix="/v1/pairsets",
    tags=["pairsets"],
    responses={401: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
)
PairSetId = Annotated[str, Path(min_length=1, max_length=64, description="The pair set's id (ps_...).")]

_SSE_BLOCK_MS = 1000
_SSE_BATCH = 100
_SSE_KEEPALIVE_S = 15.0
_EVENTS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The events as JSON, or, with `Accept: text/event-stream`, streamed as server-sent events "
        "(`id`, `event` = type, `data` = the event as JSON) until the pair set has finished.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    404: {"model": ErrorResponse},
}


def _start_pairset(redis: Redis, settings: Settings, owner: str, body: PairSetCreate) -> dict[str, Any]:
    """Check the dataset (yours, ready), record the pair set `queued`, and hand it to the pipeline hook."""
    try:
        dataset = records.get(redis, records.DATASET, body.dataset_id, owner)
    except NotFoundError as exc:
        raise NotFoundError(exc.message, code=exc.code, param="dataset_id") from None
    if dataset["status"] != "ready":
        raise ConflictError(
            f"dataset {body.dataset_id} is {dataset['status']}, not ready", code="dataset_not_ready", param="dataset_id"
        )
    record = records.create(
        redis,
        records.PAIRSET,
        records.new_pairset(owner, dataset_id=body.dataset_id, model=body.model, config=body.model_dump(mode="json")),
    )
    try:
        records.append_event(redis, record["id"], "created", {"status": "queued"})
        jobs.enqueue_pairset(redis, record["id"], settings=settings)
    except BaseException:
        records.delete(redis, records.PAIRSET, record)  # no record waits for a job that never comes
        raise
    return PairSet.model_validate(record).model_dump(mode="json")


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=PairSet,
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
)
def create_pairset(
    body: PairSetCreate,
    key: CurrentKey,
    redis: RedisDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    """Make preference pairs from a ready dataset: augment, generate, select by attention, post-select, export."""
    return run_once(
        redis,
        settings,
        owner=key.owner,
        key=idempotency_key,
        request_fingerprint=fingerprint("pairset", body.model_dump(mode="json")),
        response=response,
        create=lambda: _start_pairset(redis, settings, key.owner, body),
    )


@router.get("", response_model=PairSetList)
def list_pairsets(key: CurrentKey, redis: RedisDep, page: PageDep) -> dict[str, Any]:
    """Your pair sets, newest first."""
    items, has_more = records.list_page(redis, records.PAIRSET, key.owner, limit=page.limit, after=page.after)
    return {"object": "list", "data": items, "has_more": has_more}


@router.get("/{pairset_id}", response_model=PairSet, responses={404: {"model": ErrorResponse}})
def get_pairset(pairset_id: PairSetId, key: CurrentKey, redis: RedisDep) -> dict[str, Any]:
    """One pair set: status, stage, progress, counts, error."""
    return records.get(redis, records.PAIRSET, pairset_id, key.owner)


@router.get("/{pairset_id}/events", response_model=EventList, responses=_EVENTS_RESPONSES)
def list_pairset_events(
    request: Request,
    pairset_id: PairSetId,
    key: CurrentKey,
    redis: RedisDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="Events per page.")] = 100,
    after: Annotated[str | None, Query(max_length=64, pattern=r"^\d+-\d+$", description="Cursor: an event id.")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64, pattern=r"^\d+-\d+$")] = None,
) -> Any:
    """The pair set's events in order (stage changes, warnings, errors); `Accept: text/event-stream` streams them."""
    records.get(redis, records.PAIRSET, pairset_id, key.owner)
    if "text/event-stream" in request.headers.get("accept", ""):
        return StreamingResponse(
            _stream_events(settings.redis_url, pairset_id, last_event_id or after),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    events, has_more = records.read_events(redis, pairset_id, after=after, limit=limit)
    return {"object": "list", "data": events, "has_more": has_more}


@router.post(
    "/{pairset_id}/cancel",
    response_model=PairSet,
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
)
def cancel_pairset(pairset_id: PairSetId, key: CurrentKey, redis: RedisDep) -> dict[str, Any]:
    """Cancel a pair set: at once if it has not started, else its jobs stop at their next check (409 once finished)."""
    record = records.request_cancel(redis, pairset_id, key.owner)
    jobs.stop_pairset(redis, pairset_id)
    return record


def _entries(reply: Any) -> list[dict[str, Any]]:
    """The events of an XREAD reply on one stream ([[stream, entries]], or empty)."""
    return records.decode_entries(reply[0][1]) if reply else []


def _sse(event: dict[str, Any]) -> str:
    return f"id: {event['id']}\nevent: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


async def _stream_events(redis_url: str, pairset_id: str, after: str | None) -> AsyncIterator[str]:
    """Server-sent events from the pair set's stream until it is finished (or deleted).

    A connection of its own, opened in the event loop that serves the stream, blocks in XREAD without
    holding a worker thread.
    """
    client = aioredis.Redis.from_url(redis_url)
    stream, key = records.events_key(pairset_id), records.record_key(records.PAIRSET, pairset_id)
    last = after or "0-0"
    quiet_since = time.monotonic()
    try:
        while True:
            raw = await client.get(key)
            # A terminal status and its event are written in one transaction: once the record says
            # finished, everything is in the stream and one last read without blocking drains it.
            finished = raw is None or json.loads(raw)["status"] in records.PAIRSET_TERMINAL
            block = None if finished else _SSE_BLOCK_MS
            events = _entries(await client.xread({stream: last}, count=_SSE_BATCH, block=block))
            for event in events:
                last = event["id"]
                yield _sse(event)
            if finished and len(events) < _SSE_BATCH:
                return
            if events:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= _SSE_KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
    finally:
        await client.aclose()
