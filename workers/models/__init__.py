"""Model families behind one interface (DESIGN 2.3, 2.4, 4).

Each module of this package that defines `FAMILY` (a `ModelFamily`) adds a family: adding one
means adding one module. `load_model` resolves a model name to a directory (building a built-in
tiny model on first use, otherwise a local path or an already cached hub id, never a download),
picks the family from `config.model_type` and returns a `ModelHandle`.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import torch

from core.errors import UserError
from core.settings import Settings, get_settings
from workers.models.base import (
    EncodedBatch,
    ModelFamily,
    ModelHandle,
    TokenLayout,
    image_spans,
    region_weights,
)
from workers.models.tiny import ensure_tiny

__all__ = [
    "FAMILIES",
    "EncodedBatch",
    "ModelFamily",
    "ModelHandle",
    "TokenLayout",
    "family_for",
    "image_spans",
    "load_model",
    "region_weights",
    "tiny_models",
]


def _discover() -> dict[str, ModelFamily]:
    families: dict[str, ModelFamily] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in {"base", "tiny"}:
            continue
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if isinstance(family, ModelFamily):
            families[family.name] = family
    return families


FAMILIES: dict[str, ModelFamily] = _discover()


def tiny_models() -> dict[str, ModelFamily]:
    """Built-in tiny model names and their families."""
    return {f.tiny_name: f for f in FAMILIES.values() if f.tiny_name}


def family_for(model_type: str) -> ModelFamily:
    """The family handling `config.model_type`; a UserError naming the supported ones otherwise."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES.values())
    raise UserError(
        f"unsupported model type {model_type!r}; supported families: {supported}",
        code="unsupported_model",
        param="model",
    )


def load_model(
    name_or_path: str,
    settings: Settings | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
) -> ModelHandle:
    """Load a model, its processor and its family, offline.

    Args:
        name_or_path: a built-in tiny model (`tiny-llava`, `tiny-qwen2.5-vl`), a local directory,
            or a hub id already in the local cache.
        settings: where built-in models live (`{data_dir}/models/{name}`); the process settings by default.
        device: where to put the model (default: cpu).
        dtype: weights dtype (default: float32 on cpu, bfloat16 elsewhere).
        attn_implementation: "sdpa" (default) or "eager" (the reference for tests).
    Returns:
        The model in eval mode with its processor and family.
    """
    settings = settings or get_settings()
    device = torch.device(device or "cpu")
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tiny = tiny_models()
    path: str | Path = (
        ensure_tiny(tiny[name_or_path], settings.data_dir) if name_or_path in tiny else name_or_path
    )

    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"model {name_or_path!r} is neither a built-in ({', '.join(sorted(tiny))}), a local model "
            f"directory, nor in the local Hugging Face cache: {exc}",
            code="model_not_found",
            param="model",
        ) from exc
    family = family_for(config.model_type)
    placement = {"device_map": str(device)} if device.type != "cpu" else {}
    model = family.load_model(
        path, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True, **placement
    )
    model.eval()
    processor = family.load_processor(path, local_files_only=True)
    return ModelHandle(name=name_or_path, model=model, processor=processor, family=family)
