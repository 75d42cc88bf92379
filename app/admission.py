"""Create-time checks that need the deployment: what a key may name (a generation endpoint, a model),
what the model allows (the LoRA target must match its modules, `max_length` must hold its images), and
the key's quotas. Everything here is decided before a job exists: a bad request costs no GPU time and
gets a 422 naming its field (429 for a quota), instead of a failure minutes later in a worker.

The model checks read the model's config and build it on the meta device (no weights, no memory); the
first check of a model imports torch and transformers into the API process, lazily.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path
from typing import Any

from redis import Redis

from core import images, records
from core.errors import InvalidValueError, QuotaError, UserError
from core.settings import Settings
from core.store import ArtifactStore

# Images per prompt at most, by format: sequence prompts carry separate images, the others one collage.
_SEQUENCE_MAX_IMAGES = 5
_TEXT_TOKENS = 16  # the least text a prompt and an answer add to the image tokens


def _at(exc: UserError, param: str) -> InvalidValueError:
    return InvalidValueError(exc.message, code=exc.code, param=param)


def check_endpoint(settings: Settings, generation: dict[str, Any]) -> None:
    """A named endpoint must be one the operator configured; backend openai needs one (named or default)."""
    endpoint = generation.get("endpoint")
    backend = generation.get("backend") or settings.generation_backend
    if endpoint is not None and endpoint not in settings.generation_endpoints:
        known = ", ".join(sorted(settings.generation_endpoints)) or "none are configured"
        raise InvalidValueError(
            f"no generation endpoint named {endpoint!r} (known: {known})", code="unknown_endpoint", param="generation.endpoint"
        )
    if backend == "openai" and endpoint is None and settings.generation_endpoint is None:
        raise InvalidValueError(
            "backend openai needs `generation.endpoint`: this deployment has no default one",
            code="no_endpoint",
            param="generation.endpoint",
        )


def check_model(settings: Settings, name: str, param: str) -> None:
    """`name` is a built-in model, a folder under MIADPO_MODELS_DIR or a cached hub id, of a supported family."""
    from workers.models import model_shape

    try:
        model_shape(name, settings)
    except UserError as exc:
        raise _at(exc, param) from None


def max_images(augmentation: dict[str, Any]) -> int:
    """The most images one prompt of a pair set with this `augmentation` holds."""
    if "sequence" not in augmentation.get("formats", ()):
        return 1
    counts = ((augmentation.get("mix") or {}).get("sequence_counts")) or {}
    used = [int(n) for n, weight in counts.items() if weight]
    return max(used) if used else _SEQUENCE_MAX_IMAGES


def check_training(
    settings: Settings, model: str, hp: dict[str, Any], *, images: int, pairs: int, param: str, model_param: str
) -> None:
    """A training of `model` with hyperparameters `hp` on `pairs` pairs of up to `images` images per prompt:
    the LoRA target matches some of the model's modules, `max_length` holds the images, the steps fit the quota.
    `param` prefixes the hyperparameters' names in errors (e.g. `train.hyperparameters`)."""
    from workers.models import model_shape

    try:
        shape = model_shape(model, settings)
    except UserError as exc:
        raise _at(exc, model_param) from None
    target = re.compile(hp["lora_target"])
    if not any(target.fullmatch(name) for name in shape.lora_modules):
        examples = ", ".join(n for n in shape.lora_modules if "language_model" in n)[:300] or ", ".join(shape.lora_modules)[:300]
        raise InvalidValueError(
            f"lora_target {hp['lora_target']!r} matches no module of {model} (it must match a whole module name, "
            f"e.g. {examples})",
            code="lora_target_matches_nothing",
            param=f"{param}.lora_target",
        )
    least = shape.min_image_tokens * images + _TEXT_TOKENS
    if hp.get("max_length") is not None and hp["max_length"] < least:
        raise InvalidValueError(
            f"max_length {hp['max_length']} cannot hold a prompt of {images} image(s): {model} needs at least "
            f"{least} tokens for it (or null: no truncation)",
            code="max_length_too_small",
            param=f"{param}.max_length",
        )
    limit = settings.max_steps_per_training
    if limit:
        steps = planned_steps(hp, pairs)
        if steps > limit:
            which = "max_steps" if hp.get("max_steps") is not None else "num_epochs"
            raise InvalidValueError(
                f"this training would run {steps} optimizer steps; this deployment allows at most {limit} per training "
                "(lower max_steps or num_epochs, or raise the batch size)",
                code="too_many_steps",
                param=f"{param}.{which}",
            )


def planned_steps(hp: dict[str, Any], pairs: int) -> int:
    """Optimizer steps of a training on `pairs` pairs (at most: on one process)."""
    if hp.get("max_steps") is not None:
        return int(hp["max_steps"])
    batch = hp.get("effective_batch_size") or hp["per_device_batch_size"] * hp["gradient_accumulation_steps"]
    return int(hp["num_epochs"]) * max(1, math.ceil(pairs / batch))


def check_prompts(settings: Settings, num: int) -> None:
    limit = settings.max_prompts_per_pairset
    if limit and num > limit:
        raise InvalidValueError(
            f"augmentation.num {num} is over this deployment's limit of {limit} prompts per pair set",
            code="too_many_prompts",
            param="augmentation.num",
        )


def check_running(r: Redis, settings: Settings, kind: str, owner: str) -> None:
    """429 when the key already has its quota of unfinished pair sets (or trainings)."""
    limit = settings.max_running_pairsets_per_key if kind == records.PAIRSET else settings.max_running_trainings_per_key
    if not limit:
        return
    terminal = records.PAIRSET_TERMINAL
    running = 0
    for resource_id in records.ids_of(r, kind, owner):
        record = records.find(r, kind, resource_id)
        if record is not None and record["status"] not in terminal:
            running += 1
    if running >= limit:
        what = "pair sets" if kind == records.PAIRSET else "trainings"
        raise QuotaError(
            f"this key has {running} unfinished {what}, the most this deployment allows at once; wait for one to "
            "finish or cancel one",
            code=f"too_many_running_{what.replace(' ', '')}",
        )


def _size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed while we walk
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def storage_of(r: Redis, store: ArtifactStore, owner: str) -> int:
    """Bytes the key's resources hold in the store; a dataset's images count in full for each dataset using
    them (as counted at ingest, `core.images`)."""
    total = 0
    for dataset_id in records.ids_of(r, records.DATASET, owner):
        total += _size(store.path("datasets", dataset_id)) + _size(store.path("uploads", dataset_id))
        total += images.image_bytes(r, dataset_id)
    for pairset_id in records.ids_of(r, records.PAIRSET, owner):
        total += _size(store.path("pairsets", pairset_id))
    for training_id in records.ids_of(r, records.TRAINING, owner):
        total += _size(store.path("trainings", training_id))
    return total


def check_storage(r: Redis, settings: Settings, store: ArtifactStore, owner: str, adding: int = 0) -> None:
    """429 when the key's files (plus `adding` bytes) are over its storage quota."""
    limit = settings.max_storage_bytes_per_key
    if not limit:
        return
    used = storage_of(r, store, owner)
    if used + adding > limit:
        raise QuotaError(
            f"this key stores {used} bytes; with this request that would pass the {limit}-byte quota of this "
            "deployment: delete datasets, pair sets or trainings you no longer need",
            code="storage_quota_exceeded",
        )
