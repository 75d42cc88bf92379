"""Model families behind one interface (DESIGN 2.3, 2.4, 4).

Each module of this package that defines `FAMILY` (a `ModelFamily`) adds a family, and its
`BUILTINS` the built-in models of that family: adding one means adding one module. `resolve_model`
turns a model name into a directory (a built-in model, built on first use or shipped with the package,
otherwise a local path or an already cached hub id, never a download); `load_model` picks the family
from `config.model_type` and returns a `ModelHandle`, `load_processor` the processor alone.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

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
from workers.models.builtin import BuiltinModel, ensure_builtin

__all__ = [
    "BUILTINS",
    "FAMILIES",
    "BuiltinModel",
    "EncodedBatch",
    "ModelFamily",
    "ModelHandle",
    "TokenLayout",
    "family_for",
    "image_spans",
    "load_model",
    "load_processor",
    "region_weights",
    "resolve_model",
]


def _discover() -> tuple[dict[str, ModelFamily], dict[str, BuiltinModel]]:
    families: dict[str, ModelFamily] = {}
    builtins: dict[str, BuiltinModel] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in {"base", "builtin"}:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if isinstance(family, ModelFamily):
            families[family.name] = family
            for model in getattr(module, "BUILTINS", ()):
                if model.name in builtins:
                    raise ValueError(f"built-in model {model.name!r} is defined twice")
                builtins[model.name] = model
    return families, builtins


FAMILIES, BUILTINS = _discover()


def resolve_model(name_or_path: str, settings: Settings | None = None) -> str | Path:
    """Where a model's files are: a built-in model's folder (built on first use), else the name as given
    (a local directory or a hub id that `from_pretrained(local_files_only=True)` finds in the cache)."""
    settings = settings or get_settings()
    if name_or_path in BUILTINS:
        return ensure_builtin(BUILTINS[name_or_path], settings.data_dir)
    return name_or_path


def _config(name_or_path: str, path: str | Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"model {name_or_path!r} is neither a built-in ({', '.join(sorted(BUILTINS))}), a local model "
            f"directory, nor in the local Hugging Face cache: {exc}",
            code="model_not_found",
            param="model",
        ) from exc


def load_processor(name_or_path: str, settings: Settings | None = None) -> tuple[ModelFamily, Any]:
    """The family and the processor (with the family's chat template) of a model, without its weights."""
    path = resolve_model(name_or_path, settings)
    family = family_for(_config(name_or_path, path).model_type)
    return family, family.load_processor(path, local_files_only=True)


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
    adapter: str | Path | None = None,
) -> ModelHandle:
    """Load a model, its processor and its family, offline.

    Args:
        name_or_path: a built-in model (`BUILTINS`: tiny-llava, tiny-llava-hf, tiny-qwen2.5-vl, ...), a
            local directory, or a hub id already in the local cache.
        settings: where built-in models live (`{data_dir}/models/{name}`); the process settings by default.
        device: where to put the model (default: cpu).
        dtype: weights dtype (default: float32 on cpu, bfloat16 elsewhere).
        attn_implementation: "sdpa" (default) or "eager" (the reference for tests).
        adapter: a LoRA adapter folder (a training's `adapter/`), merged into the weights: the model then
            runs exactly like the base model, attention recording included.
    Returns:
        The model in eval mode with its processor and family.
    """
    settings = settings or get_settings()
    device = torch.device(device or "cpu")
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    path = resolve_model(name_or_path, settings)
    family = family_for(_config(name_or_path, path).model_type)
    placement = {"device_map": str(device)} if device.type != "cpu" else {}
    model = family.load_model(
        path, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True, **placement
    )
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), local_files_only=True).merge_and_unload()
    model.eval()
    processor = family.load_processor(path, local_files_only=True)
    return ModelHandle(name=name_or_path, model=model, processor=processor, family=family)
