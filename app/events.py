"""A resource's events over HTTP (pair sets, trainings): a JSON page, or server-sent events until it has finished.

The events live in a Redis stream per resource (`core.records`); a route checks that the resource is the
caller's and hands over to `events_response`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import Depends, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from redis import Redis
from redis.exceptions import RedisError

from app.schemas import ErrorResponse
from core import records

log = logging.getLogger(__name__)

_SSE_BLOCK_MS = 1000
_SSE_BATCH = 100
_SSE_KEEPALIVE_S = 15.0


def events_responses(noun: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI responses of an events route for a resource called `noun` ("pair set", "training")."""
    return {
        200: {
            "description": "The events as JSON, or, with `Accept: text/event-stream`, streamed as server-sent events "
            f"(`id`, `event` = type, `data` = the event as JSON) until the {noun} has finished.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        404: {"model": ErrorResponse},
    }


@dataclass(frozen=True)
class EventsQuery:
    """Which events: at most `limit` after the event id `after` (an SSE client resumes with Last-Event-ID)."""

    limit: int
    after: str | None


def _events_query(
    limit: Annotated[int, Query(ge=1, le=1000, description="Events per page.")] = 100,
    after: Annotated[str | None, Query(max_length=64, pattern=r"^\d+-\d+$", description="Cursor: an event id.")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64, pattern=r"^\d+-\d+$")] = None,
) -> EventsQuery:
    for where, value in (("Last-Event-ID", last_event_id), ("after", after)):
        if value is not None and any(int(part) >= 2**64 for part in value.split("-")):
            # Redis stream ids are two 64-bit numbers; past that Redis answers an error, not an empty page.
            loc = ("header", where) if where == "Last-Event-ID" else ("query", where)
            raise RequestValidationError([{"type": "event_id_out_of_range", "loc": loc, "msg": "not an event id (each part must be below 2^64)"}])
    return EventsQuery(limit=limit, after=last_event_id or after)


EventsQueryDep = Annotated[EventsQuery, Depends(_events_query)]


def events_response(
    request: Request, redis: Redis, redis_url: str, kind: str, resource_id: str, query: EventsQuery
) -> Any:
    """A page of the resource's events, or, when the client accepts `text/event-stream`, the stream."""
    if "text/event-stream" in request.headers.get("accept", ""):
        return StreamingResponse(
            _stream_events(redis_url, kind, resource_id, query.after),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    events, has_more = records.read_events(redis, resource_id, after=query.after, limit=query.limit)
    return {"object": "list", "data": events, "has_more": has_more}


def _entries(reply: Any) -> list[dict[str, Any]]:
    """The events of an XREAD reply on one stream ([[stream, entries]], or empty)."""
    return records.decode_entries(reply[0][1]) if reply else []


def _sse(event: dict[str, Any]) -> str:
    return f"id: {event['id']}\nevent: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


async def _stream_events(redis_url: str, kind: str, resource_id: str, after: str | None) -> AsyncIterator[str]:
    """Server-sent events from the resource's stream until it is finished (or deleted).

    A connection of its own, opened in the event loop that serves the stream, blocks in XREAD without
    holding a worker thread.
    """
    client = aioredis.Redis.from_url(redis_url)
    stream, key, terminal = records.events_key(resource_id), records.record_key(kind, resource_id), records.TERMINAL[kind]
    last = after or "0-0"
    quiet_since = time.monotonic()
    try:
        while True:
            raw = await client.get(key)
            # A terminal status and its event are written in one transaction: once the record says
            # finished, everything is in the stream and one last read without blocking drains it.
            finished = raw is None or json.loads(raw)["status"] in terminal
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
    except RedisError as exc:
        # The response has started: no status to change, so the stream ends with an error event the client
        # can act on (reconnect with Last-Event-ID), not with an exception in the server.
        log.warning("event stream of %s %s ended: %r", kind, resource_id, exc)
        error = {"code": "redis_unavailable", "message": "job state is unreachable for the moment; reconnect with Last-Event-ID"}
        yield f"event: error\ndata: {json.dumps(error)}\n\n"
    finally:
        await client.aclose()
