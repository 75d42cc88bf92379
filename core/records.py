"""Resource records (datasets, pair sets, trainings), their events and idempotency keys, in Redis.

Nothing here knows about HTTP: the API and the jobs both read and write records through these functions.

Keys (all under `miadpo:`):

    dataset|pairset|training:{id}      the record, one JSON string
    owner:{owner}:{kind}s              the owner's ids in a sorted set, all with score 0: ids start with
                                       their creation time, so lexicographic order is creation order and a
                                       list cursor (`after` = an id) keeps working when that id is deleted
    events:{id}                        a stream (XADD) of the resource's events, read in order
    cancel:{id}                        the cancel flag that running jobs check between batches
    progress:{id}                      a pair set's prompts done per shard (a hash: shard index -> count)
    progress-event:{id}                held for a few seconds after a progress event: at most one per interval
    idem:{owner}:{sha256(key)}         the first response to an Idempotency-Key

A record never holds an API key: `owner` is the key's sha256 (`owner_of`).
"""

from __future__ import annotations

import hashlib
import json
import math
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
ID_PREFIXES = {DATASET: "ds_", PAIRSET: "ps_", TRAINING: "tr_"}

DATASET_STATUSES = ("validating", "ready", "failed")
PAIRSET_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
PAIRSET_TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
TRAINING_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TRAINING_TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
TERMINAL = {PAIRSET: PAIRSET_TERMINAL, TRAINING: TRAINING_TERMINAL}  # statuses after which a record never changes

# Crockford base32 in lower case: digits sort before letters, so ids sort like their timestamps.
_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_EVENTS_MAXLEN = 10_000
_CANCEL_TTL_S = 30 * 24 * 3600
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


def _cancel_key(resource_id: str) -> str:
    return f"{PREFIX}cancel:{resource_id}"


def _progress_key(resource_id: str) -> str:
    return f"{PREFIX}progress:{resource_id}"


def _progress_event_key(resource_id: str) -> str:
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
    event: Callable[[Record], tuple[str, dict[str, Any]]] | None = None,
) -> Record:
    """Read-modify-write under WATCH: concurrent writers (API and jobs) never lose each other's changes.

    `mutate` gets a copy of the record and returns the new record, or None to leave it unchanged; what it
    raises propagates. `event(new)` gives the (type, data) of an event appended in the same transaction
    when the record changed, so a reader that sees the new record also finds its event.
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
                if event is not None:
                    pipe.xadd(events_key(resource_id), _event_fields(*event(new)), maxlen=_EVENTS_MAXLEN, approximate=True)  # type: ignore[arg-type]
                pipe.execute()
                return new
            except WatchError:
                continue
    raise ConflictError(f"{kind} {resource_id} is being changed concurrently; try again", code="concurrent_update")


def delete(r: Redis, kind: str, record: Record) -> None:
    """Remove a record, its owner index entry, its events and its cancel flag."""
    with r.pipeline() as pipe:
        rid = record["id"]
        pipe.delete(record_key(kind, rid), events_key(rid), _cancel_key(rid), _progress_key(rid))
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


def read_events(r: Redis, resource_id: str, *, after: str | None = None, limit: int = 100) -> tuple[list[Record], bool]:
    """Events in the order they happened, after the event id `after`; and whether there are more."""
    start = f"({after}" if after else "-"
    events = decode_entries(r.xrange(events_key(resource_id), start, "+", count=limit + 1))
    return events[:limit], len(events) > limit


# --------------------------------------------------------------------------------------------------
# Datasets


def new_dataset(owner: str, *, dataset_id: str, name: str | None, format: str | None, upload: str) -> Record:
    """A dataset record as created by an upload: `validating` until the ingest job is done.

    `upload` is the path of the uploaded file relative to the artifact store.
    """
    return {
        "id": dataset_id,
        "object": "dataset",
        "name": name,
        "format": format,
        "status": "validating",
        "num_rows": 0,
        "num_samples": 0,
        "num_images": 0,
        "num_problems": 0,
        "problems": [],
        "error": None,
        "created_at": now(),
        "owner": owner,
        "upload": upload,
    }


def set_dataset_ready(r: Redis, dataset_id: str, manifest: dict[str, Any], *, max_problems: int) -> Record:
    """Store an ingested dataset's counts and (the first `max_problems`) problems; status `ready`."""

    def mutate(rec: Record) -> Record:
        problems = manifest.get("problems", [])
        rec.update(
            status="ready",
            format=manifest["source_format"],
            num_rows=manifest["num_rows"],
            num_samples=manifest["num_samples"],
            num_images=manifest["num_images"],
            num_problems=len(problems),
            problems=problems[:max_problems],
            error=None,
        )
        return rec

    return update(r, DATASET, dataset_id, mutate, event=lambda rec: ("status", {"status": "ready"}))


def set_dataset_failed(r: Redis, dataset_id: str, *, code: str, message: str) -> Record:
    """Status `failed` with {code, message}; a dataset that is already ready stays ready."""

    def mutate(rec: Record) -> Record | None:
        if rec["status"] != "validating":
            return None
        rec.update(status="failed", error={"code": code, "message": message})
        return rec

    return update(r, DATASET, dataset_id, mutate, event=lambda rec: ("status", {"status": "failed", "error": rec["error"]}))


# --------------------------------------------------------------------------------------------------
# Pair sets


def new_pairset(owner: str, *, dataset_id: str, model: str, config: dict[str, Any]) -> Record:
    """A queued pair-set record; `config` is the validated create request."""
    return {
        "id": new_id(PAIRSET),
        "object": "pairset",
        "dataset_id": dataset_id,
        "model": model,
        "status": "queued",
        "stage": None,
        "progress": {"done": 0, "total": 0},
        "counts": {
            "prompts": 0,
            "candidates": 0,
            "hallucinated": 0,
            "pairs": 0,
            "removed": {"perplexity": 0, "length_ratio": 0, "edit_distance": 0},
        },
        "error": None,
        "config": config,
        "created_at": now(),
        "started_at": None,
        "finished_at": None,
        "owner": owner,
    }


def set_pairset_status(
    r: Redis,
    pairset_id: str,
    status: str,
    *,
    stage: str | None = None,
    error: dict[str, str] | None = None,
    allowed_from: tuple[str, ...] = ("queued", "running"),
) -> Record:
    """Move a pair set to `status` if it is in one of `allowed_from` (a terminal one never changes again)."""
    if status not in PAIRSET_STATUSES:
        raise ValueError(f"status must be one of {PAIRSET_STATUSES}, got {status!r}")

    def mutate(rec: Record) -> Record | None:
        if rec["status"] not in allowed_from or rec["status"] == status:
            return None
        rec["status"] = status
        if stage is not None:
            rec["stage"] = stage
        if error is not None:
            rec["error"] = error
        if status == "running" and rec.get("started_at") is None:
            rec["started_at"] = now()
        if status in PAIRSET_TERMINAL:
            rec["finished_at"] = now()
        return rec

    def event(rec: Record) -> tuple[str, dict[str, Any]]:
        return "status", {"status": rec["status"], "stage": rec["stage"], "error": rec["error"]}

    return update(r, PAIRSET, pairset_id, mutate, event=event)


def start_pairset(r: Redis, pairset_id: str, *, total: int, num_shards: int) -> Record:
    """`queued` -> `running` in stage `generate` with progress {0, total}; the record keeps `num_shards`
    (not shown by the API) for `core.jobs.stop_pairset`. A re-run on a running pair set keeps its progress;
    one that has finished (cancelled in the meantime) is left alone."""

    def mutate(rec: Record) -> Record | None:
        if rec["status"] == "running" and rec.get("num_shards") == num_shards:
            return None
        if rec["status"] not in ("queued", "running"):
            return None
        if rec["status"] == "queued":
            rec.update(status="running", stage="generate", progress={"done": 0, "total": total}, started_at=now())
        rec["num_shards"] = num_shards
        return rec

    def event(rec: Record) -> tuple[str, dict[str, Any]]:
        return "status", {"status": rec["status"], "stage": rec["stage"], "error": rec["error"]}

    return update(r, PAIRSET, pairset_id, mutate, event=event)


def set_pairset_stage(r: Redis, pairset_id: str, stage: str, **fields: Any) -> Record:
    """Move a running pair set to `stage` (and set `fields`), with a `stage` event; else leave it alone."""

    def mutate(rec: Record) -> Record | None:
        if rec["status"] != "running":
            return None
        rec.update(stage=stage, **fields)
        return rec

    return update(r, PAIRSET, pairset_id, mutate, event=lambda rec: ("stage", {"stage": rec["stage"]}))


def report_shard_progress(r: Redis, pairset_id: str, shard: int, done: int, *, event_every_s: float = 2.0) -> Record:
    """Shard `shard` has finished `done` of its prompts: update `progress.done`; return the record.

    Each shard's count is a field of one hash, overwritten (HSET), never added to: a shard re-run after
    its worker died counts its prompts once. `progress.done` is the sum over shards, written under
    WATCH and never lowered, so shard jobs on different workers cannot undo each other's updates; a
    pair set that is no longer running is not touched (the caller sees its status and stops). At most
    one `progress` event per `event_every_s`, whichever shard reports.
    """
    key = _progress_key(pairset_id)
    with r.pipeline() as pipe:
        pipe.hset(key, str(shard), done)
        pipe.expire(key, _CANCEL_TTL_S)
        pipe.hvals(key)
        total_done = sum(int(v) for v in pipe.execute()[-1])

    def mutate(rec: Record) -> Record | None:
        if rec["status"] != "running" or total_done <= rec["progress"]["done"]:
            return None
        rec["progress"] = {**rec["progress"], "done": total_done}
        return rec

    rec = update(r, PAIRSET, pairset_id, mutate)
    if rec["status"] == "running" and r.set(_progress_event_key(pairset_id), 1, nx=True, px=int(event_every_s * 1000)):
        append_event(r, pairset_id, "progress", dict(rec["progress"]))
    return rec


def shard_progress(r: Redis, pairset_id: str) -> dict[int, int]:
    """Prompts done per shard index, as the shard jobs last reported them."""
    raw: dict[Any, Any] = r.hgetall(_progress_key(pairset_id))
    return {int(k): int(v) for k, v in raw.items()}


def finish_pairset(r: Redis, pairset_id: str, counts: dict[str, Any]) -> Record:
    """A running pair set `succeeded` in stage `done` with its final counts (left alone if it was cancelled)."""

    def mutate(rec: Record) -> Record | None:
        if rec["status"] != "running":
            return None
        rec.update(status="succeeded", stage="done", counts=counts, finished_at=now())
        rec["progress"] = {**rec["progress"], "done": rec["progress"]["total"]}
        return rec

    def event(rec: Record) -> tuple[str, dict[str, Any]]:
        return "status", {"status": rec["status"], "stage": rec["stage"], "error": rec["error"], "counts": rec["counts"]}

    return update(r, PAIRSET, pairset_id, mutate, event=event)


def request_cancel(r: Redis, pairset_id: str, owner: str) -> Record:
    """Raise the cancel flag and mark the pair set `cancelled` at once (queued or running).

    ConflictError when it has already finished. Its jobs are stopped by `core.jobs.stop_pairset`; a
    running shard job sees the flag (or the status) at its next batch and stops without a retry, and
    its progress is no longer recorded.
    """
    rec = get(r, PAIRSET, pairset_id, owner)
    if rec["status"] in PAIRSET_TERMINAL:
        raise ConflictError(
            f"pair set {pairset_id} is already {rec['status']}", code="pairset_finished", param="id"
        )
    r.set(_cancel_key(pairset_id), "1", ex=_CANCEL_TTL_S)
    append_event(r, pairset_id, "cancel_requested", {})
    return set_pairset_status(r, pairset_id, "cancelled")


def cancel_requested(r: Redis, resource_id: str) -> bool:
    """Whether a cancel was asked for: jobs call this between batches."""
    return bool(r.exists(_cancel_key(resource_id)))


# --------------------------------------------------------------------------------------------------
# Trainings


def new_training(
    owner: str,
    *,
    pairset_id: str,
    model: str,
    hyperparameters: dict[str, Any],
    checkpoint_every: int,
    training_id: str | None = None,
) -> Record:
    """A queued training record; `hyperparameters` is the full set (defaults filled in)."""
    return {
        "id": training_id or new_id(TRAINING),
        "object": "training",
        "pairset_id": pairset_id,
        "model": model,
        "hyperparameters": hyperparameters,
        "checkpoint_every": checkpoint_every,
        "status": "queued",
        "progress": {"step": 0, "total_steps": hyperparameters.get("max_steps") or 0},
        "metrics": {},
        "checkpoints": {"count": 0, "last_step": None},
        "adapter": None,
        "error": None,
        "created_at": now(),
        "started_at": None,
        "finished_at": None,
        "owner": owner,
    }


def _training_status(rec: Record) -> tuple[str, dict[str, Any]]:
    return "status", {"status": rec["status"], "progress": rec["progress"], "error": rec["error"]}


def set_training_status(
    r: Redis,
    training_id: str,
    status: str,
    *,
    error: dict[str, str] | None = None,
    allowed_from: tuple[str, ...] = ("queued", "running"),
) -> Record:
    """Move a training to `status` if it is in one of `allowed_from` (a terminal one never changes again)."""
    if status not in TRAINING_STATUSES:
        raise ValueError(f"status must be one of {TRAINING_STATUSES}, got {status!r}")

    def mutate(rec: Record) -> Record | None:
        if rec["status"] not in allowed_from or rec["status"] == status:
            return None
        rec["status"] = status
        if error is not None:
            rec["error"] = error
        if status == "running" and rec.get("started_at") is None:
            rec["started_at"] = now()
        if status in TRAINING_TERMINAL:
            rec["finished_at"] = now()
        return rec

    return update(r, TRAINING, training_id, mutate, event=_training_status)


def start_training(r: Redis, training_id: str, *, step: int) -> Record:
    """A training job begins: `queued` -> `running`, at `step` (0, or the checkpoint it resumes from).

    A re-run of a running training (its worker died) goes back to the step of the checkpoint it resumes
    from, with a `resumed` event: the steps after it are done again. A finished training is left alone.
    """
    before: list[str] = []

    def mutate(rec: Record) -> Record | None:
        before[:] = [rec["status"]]
        if rec["status"] not in ("queued", "running"):
            return None
        if rec["status"] == "queued":
            rec.update(status="running", started_at=now())
        rec["progress"] = {**rec["progress"], "step": step}
        return rec

    def event(rec: Record) -> tuple[str, dict[str, Any]]:
        return _training_status(rec) if before == ["queued"] else ("resumed", {"step": step})

    return update(r, TRAINING, training_id, mutate, event=event)


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    """JSON has no NaN or infinity: such a metric (a diverged loss) is left out."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


def report_training_step(
    r: Redis, training_id: str, *, step: int, total_steps: int, metrics: dict[str, Any], event: dict[str, Any] | None = None
) -> Record:
    """A running training finished optimizer step `step`: its progress and latest metrics; with `event`
    (extra data), a `step` event in the same write. A training that is no longer running is not touched."""

    def mutate(rec: Record) -> Record | None:
        if rec["status"] != "running":
            return None
        rec.update(progress={"step": step, "total_steps": total_steps}, metrics=_finite(metrics))
        return rec

    def step_event(rec: Record) -> tuple[str, dict[str, Any]]:
        return "step", {**(event or {}), **rec["progress"], "metrics": rec["metrics"]}

    return update(r, TRAINING, training_id, mutate, event=step_event if event is not None else None)


def report_training_checkpoint(r: Redis, training_id: str, *, step: int, count: int, metrics: dict[str, Any]) -> Record:
    """A complete checkpoint of `step` is in the store (`count` of them now), with a `checkpoint` event.
    Also recorded for a cancelled training: a cancel saves the step it stopped at."""

    def mutate(rec: Record) -> Record | None:
        if rec["status"] not in ("running", "cancelled"):
            return None
        rec["checkpoints"] = {"count": count, "last_step": step}
        return rec

    def event(rec: Record) -> tuple[str, dict[str, Any]]:
        return "checkpoint", {"step": step, "metrics": _finite(metrics)}

    return update(r, TRAINING, training_id, mutate, event=event)


def finish_training(
    r: Redis, training_id: str, *, step: int, total_steps: int, metrics: dict[str, Any], adapter: dict[str, Any]
) -> Record:
    """A running training `succeeded`: its last step, final metrics and adapter {size_bytes, url}."""

    def mutate(rec: Record) -> Record | None:
        if rec["status"] != "running":
            return None
        rec.update(
            status="succeeded",
            progress={"step": step, "total_steps": total_steps},
            adapter=adapter,
            finished_at=now(),
        )
        if metrics:
            rec["metrics"] = _finite(metrics)
        return rec

    return update(r, TRAINING, training_id, mutate, event=_training_status)


def request_training_cancel(r: Redis, training_id: str, owner: str) -> Record:
    """Raise the cancel flag and mark the training `cancelled` at once (queued or running).

    ConflictError when it has already finished. A queued job is dropped (`core.jobs.stop_training`); a
    running one sees the flag after its current optimizer step, saves a checkpoint of it and stops.
    """
    rec = get(r, TRAINING, training_id, owner)
    if rec["status"] in TRAINING_TERMINAL:
        raise ConflictError(
            f"training {training_id} is already {rec['status']}", code="training_finished", param="id"
        )
    r.set(_cancel_key(training_id), "1", ex=_CANCEL_TTL_S)
    append_event(r, training_id, "cancel_requested", {})
    return set_training_status(r, training_id, "cancelled")


def link_training(r: Redis, pairset_id: str, training_id: str) -> str:
    """Record `training_id` as the training a pair set's `train` started, unless it has one already;
    return the one it has now (so a re-run of the job that chains the training never starts two)."""

    def mutate(rec: Record) -> Record | None:
        if rec.get("training_id"):
            return None
        rec["training_id"] = training_id
        return rec

    return str(update(r, PAIRSET, pairset_id, mutate)["training_id"])


# --------------------------------------------------------------------------------------------------
# Idempotency keys


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
