"""Reference counts of the content-addressed images (DESIGN 3.4): an image shared by several datasets (of
any key) is stored once, and removed with the last dataset that uses it.

Counts live in Redis (`miadpo:image-refs`, ref -> datasets using it) and change under one lock, so that a
dataset being deleted and one being ingested with the same image never race: an ingest counts its images
once they are all on disk and, if one was removed in between (its count had just dropped to 0), fails
with a transient error; its retry writes the image again (the upload is kept until the dataset is ready).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from redis import Redis

from core.dataset import iter_samples
from core.errors import TransientError
from core.store import ArtifactStore

REFS = "miadpo:image-refs"
_LOCK = "miadpo:image-refs:lock"


def _counted_key(dataset_id: str) -> str:
    return f"miadpo:image-refs:dataset:{dataset_id}"  # the refs a dataset counted (and whether it did)


def _bytes_key(dataset_id: str) -> str:
    return f"miadpo:image-refs:bytes:{dataset_id}"  # the bytes of a dataset's images, for the storage quota


def image_bytes(r: Redis, dataset_id: str) -> int:
    """Bytes of the images a dataset uses (each counted whole, shared or not); 0 before it was counted."""
    return int(r.get(_bytes_key(dataset_id)) or 0)


def dataset_refs(store: ArtifactStore, dataset_id: str) -> set[str]:
    return {sample.image for sample in iter_samples(store, dataset_id)}


def acquire(r: Redis, store: ArtifactStore, dataset_id: str, refs: Iterable[str]) -> None:
    """Count `refs` as used by `dataset_id` (once: a retried ingest counts nothing twice).

    Raises:
        TransientError: an image was removed while the dataset was being ingested; a retry writes it again.
    """
    refs = sorted(set(refs))
    with r.lock(_LOCK, timeout=120, blocking_timeout=60):
        if r.exists(_counted_key(dataset_id)):
            return
        missing = [ref for ref in refs if not store.has_image(ref)]
        if missing:
            raise TransientError(
                f"{len(missing)} image(s) of dataset {dataset_id} were removed while it was ingested; retrying",
                code="images_removed",
            )
        size = sum(store.image_path(ref).stat().st_size for ref in refs)
        with r.pipeline() as pipe:
            pipe.set(_bytes_key(dataset_id), size)
            for ref in refs:
                pipe.hincrby(REFS, ref, 1)
            if refs:
                pipe.sadd(_counted_key(dataset_id), *refs)
            else:
                pipe.set(_counted_key(dataset_id), "")
            pipe.execute()


def release(r: Redis, store: ArtifactStore, dataset_id: str) -> int:
    """Un-count a deleted dataset's images and remove those no dataset uses any more; the number removed."""
    removed = 0
    with r.lock(_LOCK, timeout=120, blocking_timeout=60):
        key = _counted_key(dataset_id)
        # A set of refs, or "" for a dataset with no image; none for one ingested before counts existed.
        refs = [m.decode() for m in r.smembers(key)] if r.type(key) == b"set" else []  # type: ignore[union-attr]
        for ref in refs:
            left = r.hincrby(REFS, ref, -1)
            if left <= 0:
                r.hdel(REFS, ref)
                with contextlib.suppress(FileNotFoundError):
                    store.image_path(ref).unlink()
                    removed += 1
        r.delete(key, _bytes_key(dataset_id))
    return removed
