"""Resource records in Redis: ids, the generic record operations, events and cancel flags.

Nothing here knows about HTTP: the API and the jobs both read and write records through these functions.

Keys (all under `miadpo:`):

    dataset|pairset|training|evaluation:{id}   the record, one JSON string
    owner:{owner}:{kind}s              the owner's ids in a sorted set, all with score 0: ids start with
                                       their creation time, so lexicographic order is creation order and a
                                       list cursor (`after` = an id) keeps working when that id is deleted
    events:{id}                        a stream (XADD) of the resource's events, read in order
    cancel:{id}                        the cancel flag that running jobs check between batches
    progress:{id}                      a pair set's (or evaluation's) prompts done per shard (a hash: shard index -> count)
    progress-event:{id}                held for a few seconds after a progress event: at most one per interval
    idem:{owner}:{sha256(key)}         the first response to an Idempotency-Key

A record never holds an API key: `owner` is the key's sha256 (`owner_of`).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from redis import Redis
from redis.exceptions import WatchError

from core.errors import ConflictError, NotFoundError

PREFIX = "miadpo:"
DATASET = "dataset"
PAIRSET = "pairset"
TRAINING = "training"
EVALUATION = "evaluation"
ID_PREFIXES = {DATASET: "ds_", PAIRSET: "ps_", TRAINING: "tr_", EVALUATION: "ev_"}

DATASET_STATUSES = ("validating", "ready", "failed")
PAIRSET_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
PAIRSET_TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
TRAINING_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TRAINING_TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
EVALUATION_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
EVALUATION_TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
TERMINAL = {PAIRSET: PAIRSET_TERMINAL, TRAINING: TRAINING_TERMINAL, EVALUATION: EVALUATION_TERMINAL}  # statuses after which a record never changes

# Crockford base32 in lower case: digits sort before letters, so ids sort like their timestamps.
_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_EVENTS_MAXLEN = 10_000
CANCEL_TTL_S = 30 * 24 * 3600
_IDEMPOTENCY_CLAIM_TTL_S = 120  # the longest a crashed request's claim blocks its key
_WATCH_RETRIES = 50
_RAND_MASK = (1 << 80) - 1
_id_lock = threading.Lock()
_last_id = (0, 0)

Record = dict[str, Any]


def owner_of(api_key: str) -> str:
    """The owner id stored in records for an API key (its sha256): keys themselves are never stored."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def _b32(value: int, width: int) -> str:
    return "".join(_ALPHABET[(value >> shift) & 31] for shift in range(5 * (width - 1), -5, -5))


def new_id(kind: str) -> str:
    """`ds_`/`ps_` + 10 characters of milliseconds since the epoch + 16 random ones (a lower-case ULID).

    Monotonic within a process: ids made in the same millisecond count up from the first one, so that
    lists ordered by id are in creation order.
    """
    global _last_id
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        last_ms, last_rand = _last_id
        if ms <= last_ms:
            ms, rand = last_ms, (last_rand + 1) & _RAND_MASK
        else:
            rand = secrets.randbits(80)
        _last_id = (ms, rand)
    return ID_PREFIXES[kind] + _b32(ms, 10) + _b32(rand, 16)


def now() -> int:
    """Unix time in seconds, as records store it."""
    return int(time.time())


def record_key(kind: str, resource_id: str) -> str:
    return f"{PREFIX}{kind}:{resource_id}"


def _owner_key(owner: str, kind: str) -> str:
    return f"{PREFIX}owner:{owner}:{kind}s"


def events_key(resource_id: str) -> str:
    return f"{PREFIX}events:{resource_id}"


def cancel_key(resource_id: str) -> str:
    return f"{PREFIX}cancel:{resource_id}"


def progress_key(resource_id: str) -> str:
    return f"{PREFIX}progress:{resource_id}"


def progress_event_key(resource_id: str) -> str:
    return f"{PREFIX}progress-event:{resource_id}"


def _dump(record: Record) -> str:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False)


# --------------------------------------------------------------------------------------------------
# Generic records


def create(r: Redis, kind: str, record: Record) -> Record:
    """Store a new record and index it under its owner."""
    with r.pipeline() as pipe:
        pipe.set(record_key(kind, record["id"]), _dump(record))
        pipe.zadd(_owner_key(record["owner"], kind), {record["id"]: 0})
        pipe.execute()
    return record


def find(r: Redis, kind: str, resource_id: str) -> Record | None:
    """The record, or None when there is none."""
    raw = r.get(record_key(kind, resource_id))
    return None if raw is None else json.loads(raw)


def get(r: Redis, kind: str, resource_id: str, owner: str | None = None) -> Record:
    """The record; NotFoundError when it does not exist or belongs to another owner (no existence leak)."""
    record = find(r, kind, resource_id)
    if record is None or (owner is not None and record.get("owner") != owner):
        raise NotFoundError(f"no {kind} with id {resource_id!r}", code=f"{kind}_not_found", param="id")
    return record


def update(
    r: Redis,
    kind: str,
    resource_id: str,
    mutate: Callable[[Record], Record | None],
    *,
    event: Callable[[Record], tuple[str, dict[str, Any]] | None] | None = None,
) -> Record:
    """Read-modify-write under WATCH: concurrent writers (API and jobs) never lose each other's changes.

    `mutate` gets a copy of the record and returns the new record, or None to leave it unchanged; what it
    raises propagates. `event(new)` gives the (type, data) of an event appended in the same transaction
    when the record changed, so a reader that sees the new record also finds its event (None: no event).
    NotFoundError when the record is gone.
    """
    key = record_key(kind, resource_id)
    for _ in range(_WATCH_RETRIES):
        with r.pipeline() as pipe:
            try:
                pipe.watch(key)
                raw = pipe.get(key)
                if raw is None:
                    raise NotFoundError(
                        f"no {kind} with id {resource_id!r}", code=f"{kind}_not_found", param="id"
                    )
                current = json.loads(raw)
                new = mutate(dict(current))
                if new is None:
                    pipe.unwatch()
                    return current
                pipe.multi()
                pipe.set(key, _dump(new))
                happened = event(new) if event is not None else None
                if happened is not None:
                    pipe.xadd(events_key(resource_id), _event_fields(*happened), maxlen=_EVENTS_MAXLEN, approximate=True)  # type: ignore[arg-type]
                pipe.execute()
                return new
            except WatchError:
                continue
    raise ConflictError(f"{kind} {resource_id} is being changed concurrently; try again", code="concurrent_update")


def delete(r: Redis, kind: str, record: Record) -> None:
    """Remove a record, its owner index entry, its events and its cancel flag."""
    with r.pipeline() as pipe:
        rid = record["id"]
        pipe.delete(record_key(kind, rid), events_key(rid), cancel_key(rid), progress_key(rid))
        pipe.zrem(_owner_key(record["owner"], kind), record["id"])
        pipe.execute()


def list_page(r: Redis, kind: str, owner: str, *, limit: int, after: str | None = None) -> tuple[list[Record], bool]:
    """One page of the owner's records, newest first, starting after the id `after`; and has_more."""
    upper = f"({after}" if after else "+"
    ids = r.zrevrangebylex(_owner_key(owner, kind), upper, "-", start=0, num=limit + 1)
    has_more = len(ids) > limit
    ids = ids[:limit]
    if not ids:
        return [], False
    raws = r.mget([record_key(kind, i.decode() if isinstance(i, bytes) else i) for i in ids])
    return [json.loads(raw) for raw in raws if raw is not None], has_more


def ids_of(r: Redis, kind: str, owner: str) -> list[str]:
    """All ids of an owner's records of one kind, newest first."""
    return [i.decode() for i in r.zrevrangebylex(_owner_key(owner, kind), "+", "-")]  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------------
# Events


def _event_fields(type: str, data: dict[str, Any]) -> dict[str, str]:
    return {"type": type, "data": _dump(data), "created_at": str(now())}


def append_event(r: Redis, resource_id: str, type: str, data: dict[str, Any] | None = None) -> str:
    """Append an event to the resource's stream; return its id (the stream entry id)."""
    fields = _event_fields(type, data or {})
    entry = r.xadd(events_key(resource_id), fields, maxlen=_EVENTS_MAXLEN, approximate=True)  # type: ignore[arg-type]
    return entry.decode() if isinstance(entry, bytes) else str(entry)


def decode_event(entry_id: bytes | str, fields: dict) -> Record:
    """A stream entry as an event object: {id, type, data, created_at}."""

    def text(v: bytes | str) -> str:
        return v.decode() if isinstance(v, bytes) else v

    f = {text(k): text(v) for k, v in fields.items()}
    return {"id": text(entry_id), "type": f["type"], "data": json.loads(f["data"]), "created_at": int(f["created_at"])}


def decode_entries(entries: Any) -> list[Record]:
    """XRANGE entries, or the entries of one stream in an XREAD reply, as event objects."""
    return [decode_event(entry_id, fields) for entry_id, fields in entries or []]


_LAST_ID = f"{2**64 - 1}-{2**64 - 1}"


def read_events(r: Redis, resource_id: str, *, after: str | None = None, limit: int = 100) -> tuple[list[Record], bool]:
    """Events in the order they happened, after the event id `after`; and whether there are more."""
    if after == _LAST_ID:
        return [], False  # nothing can come after it (and Redis refuses the exclusive interval)
    start = f"({after}" if after else "-"
    events = decode_entries(r.xrange(events_key(resource_id), start, "+", count=limit + 1))
    return events[:limit], len(events) > limit



def cancel_requested(r: Redis, resource_id: str) -> bool:
    """Whether a cancel was asked for: jobs call this between batches."""
    return bool(r.exists(cancel_key(resource_id)))

