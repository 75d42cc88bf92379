"""A pair set's prompts as the API and the viewer show them: pages from the prompt index (`core.prompts`),
and their images and attention heat maps, rendered on request and cached in the store.

Rendering needs the pipeline's renderer (`workers.render`, which imports torch): it is imported on the
first image asked for, not when the API starts, and every PNG is kept under `pairsets/{id}/viewer/`, so a
prompt's images are rendered once whoever looks at them.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from redis import Redis

from core import prompts, records
from core.errors import ConflictError, NotFoundError
from core.store import ArtifactStore

_CANDIDATE_FIELDS = ("text", "num_tokens", "finish_reason", "ratio", "perplexity", "hallucinated", "reason")


def succeeded_pairset(redis: Redis, pairset_id: str, owner: str) -> dict[str, Any]:
    """A pair set of `owner`'s that has succeeded (409 before: its prompts are indexed when it merges)."""
    record = records.get(redis, records.PAIRSET, pairset_id, owner)
    if record["status"] != "succeeded":
        raise ConflictError(
            f"pair set {pairset_id} is {record['status']}: its prompts are listed once it has succeeded",
            code="pairset_not_succeeded",
            param="id",
        )
    return record


def load_index(store: ArtifactStore, pairset_id: str) -> np.ndarray:
    try:
        return prompts.load_index(prompts.index_path(store, pairset_id))
    except prompts.NoIndex:
        raise ConflictError(
            f"pair set {pairset_id} has no prompt index (it was merged by an older version)",
            code="no_prompt_index",
            param="id",
        ) from None


def _shards(store: ArtifactStore, pairset_id: str) -> Path:
    return store.path("pairsets", pairset_id, "shards")


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _target_box(recipe: dict[str, Any]) -> list[int] | None:
    from workers.augment import Recipe
    from workers.render import target_box

    box = target_box(Recipe.from_dict(recipe))
    return None if box is None else [int(v) for v in box]


def describe(pairset_id: str, row: np.void, record: dict[str, Any], base: str = "/v1") -> dict[str, Any]:
    """One prompt as the API lists it: the recipe's question and answer, where the target is, the outcome,
    and every candidate with its ratio, verdict and heat-map URLs (no raw attention)."""
    recipe = record["recipe"]
    uid = record["uid"]
    n_shown = len(record.get("layouts") or []) or (len(recipe["images"]) if recipe["format"] == "sequence" else 1)
    url = f"{base}/pairsets/{pairset_id}/prompts/{uid}"
    return {
        "uid": uid,
        "format": recipe["format"],
        "n_images": len(recipe["images"]),
        "target_index": recipe["target_index"],
        "question": recipe["question"],
        "prompt": recipe["prompt"],
        "answer": recipe["answer"],
        "outcome": prompts.OUTCOMES[int(row["outcome"])],
        "threshold": _finite(record["threshold"]),
        "comparison": record.get("comparison", "<="),
        "attention_rows": record.get("attention_rows"),
        "rejected": record["rejected"],
        "stats": {k: _finite(v) for k, v in record["stats"].items()} if record["stats"] else None,
        "image_urls": [f"{url}/images/{k}" for k in range(n_shown)],
        "candidates": [
            {
                "index": j,
                **{k: (_finite(c.get(k)) if k in ("ratio", "perplexity") else c.get(k)) for k in _CANDIDATE_FIELDS},
                "heatmap_urls": [f"{url}/candidates/{j}/heatmaps/{k}" for k in range(n_shown)] if c.get("attention") else [],
            }
            for j, c in enumerate(record["candidates"])
        ],
    }


def page(
    store: ArtifactStore, pairset_id: str, filters: prompts.Filters, *, limit: int, after: str | None, base: str = "/v1"
) -> tuple[list[dict[str, Any]], bool, int]:
    """A page of prompts (described), has_more and the number of prompts the filters match."""
    index = load_index(store, pairset_id)
    rows, has_more, total = prompts.page(index, filters, limit=limit, after=after)
    shards = _shards(store, pairset_id)
    return [describe(pairset_id, row, prompts.read_record(shards, row), base) for row in rows], has_more, total


def record_of(store: ArtifactStore, pairset_id: str, uid: str) -> tuple[np.void, dict[str, Any]]:
    """One prompt's index row and shard record (404 when the pair set has no such prompt)."""
    row = prompts.find(load_index(store, pairset_id), uid)
    if row is None:
        raise NotFoundError(f"pair set {pairset_id} has no prompt {uid}", code="prompt_not_found", param="uid")
    return row, prompts.read_record(_shards(store, pairset_id), row)


# --------------------------------------------------------------------------------------------------
# Images and heat maps


def _cache(store: ArtifactStore, pairset_id: str, uid: str, name: str) -> Path:
    return store.path("pairsets", pairset_id, "viewer", uid, name)


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _rendered(store: ArtifactStore, record: dict[str, Any]) -> list[Any]:
    from workers.augment import Recipe
    from workers.render import render_recipe, store_loader

    return render_recipe(Recipe.from_dict(record["recipe"]), store_loader(store))


def _check_image(record: dict[str, Any], index: int) -> None:
    recipe = record["recipe"]
    shown = len(recipe["images"]) if recipe["format"] == "sequence" else 1
    if not 0 <= index < shown:
        raise NotFoundError(f"prompt {record['uid']} has no image {index}", code="image_not_found", param="index")


def image_png(store: ArtifactStore, pairset_id: str, uid: str, index: int, *, outlined: bool = False) -> bytes:
    """Image `index` of a prompt as the model was shown it (noise aside), PNG; `outlined`: with the target
    (cell, inset, or the whole target image of a sequence) outlined."""
    path = _cache(store, pairset_id, uid, f"image-{index}{'-target' if outlined else ''}.png")
    if path.is_file():
        return path.read_bytes()
    _, record = record_of(store, pairset_id, uid)
    _check_image(record, index)
    from workers.heatmap import outline

    image = _rendered(store, record)[index]
    recipe = record["recipe"]
    if outlined:
        if recipe["format"] != "sequence":
            outline(image, _target_box(recipe))
        elif index == recipe["target_index"]:
            outline(image)
    data = _png(image)
    store.write_bytes(str(path.relative_to(store.root)), data)
    return data


def heatmap_png(store: ArtifactStore, pairset_id: str, uid: str, candidate: int, index: int) -> bytes:
    """Candidate `candidate`'s attention over image `index` of a prompt, PNG, the target outlined."""
    path = _cache(store, pairset_id, uid, f"heatmap-{candidate}-{index}.png")
    if path.is_file():
        return path.read_bytes()
    _, record = record_of(store, pairset_id, uid)
    _check_image(record, index)
    cands = record["candidates"]
    if not 0 <= candidate < len(cands):
        raise NotFoundError(f"prompt {uid} has no candidate {candidate}", code="candidate_not_found", param="candidate")
    layouts = record.get("layouts") or []
    if not cands[candidate].get("attention") or index >= len(layouts):
        raise NotFoundError(f"prompt {uid} has no attention for candidate {candidate}", code="attention_not_found", param="candidate")
    from workers.heatmap import grid_scale, heatmap, image_values

    attention = prompts.decode_attention(cands[candidate]["attention"])
    recipe = record["recipe"]
    box = _target_box(recipe) if recipe["format"] != "sequence" else None
    image = _rendered(store, record)[index]
    if recipe["format"] == "sequence" and index == recipe["target_index"]:
        box = [0, 0, *image.size]
    drawn = heatmap(image, image_values(attention, layouts, index), layouts[index], scale=grid_scale(attention, layouts), box=box)
    data = _png(drawn)
    store.write_bytes(str(path.relative_to(store.root)), data)
    return data
