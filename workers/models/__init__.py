"""Model families behind one interface (DESIGN 2.3, 2.4, 4).

Each module of this package that defines `FAMILY` (a `ModelFamily`) adds a family, and its
`BUILTINS` the built-in models of that family: adding one means adding one module. `resolve_model`
turns a model name into a directory (a built-in model, built on first use or shipped with the package,
otherwise a folder under the operator's MIADPO_MODELS_DIR or an already cached hub id; never a download, never
an arbitrary path); `load_model` picks the family
from `config.model_type` and returns a `ModelHandle`, `load_processor` the processor alone.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from dataclasses import dataclass
from functools import lru_cache
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
from workers.models.builtin import BuiltinModel, cached_hub_model, ensure_builtin, operator_model

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
    "model_shape",
    "region_weights",
    "resolve_model",
]

log = logging.getLogger(__name__)


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


def resolve_model(name: str, settings: Settings | None = None) -> Path:
    """Where a model's files are: a built-in model's folder (built on first use), a folder the operator
    put under `MIADPO_MODELS_DIR`, or the snapshot of a hub id already in the local cache. Never an
    arbitrary path: a tenant names models, and the answer says nothing about what exists on the host.

    Raises:
        UserError: `model_not_found` for anything else.
    """
    settings = settings or get_settings()
    if name in BUILTINS:
        return ensure_builtin(BUILTINS[name], settings.data_dir)
    found = operator_model(name, settings.models_dir) or cached_hub_model(name)
    if found is None:
        where = ", a folder of MIADPO_MODELS_DIR" if settings.models_dir is not None else ""
        raise UserError(
            f"model {name!r} is not available here: use a built-in model ({', '.join(sorted(BUILTINS))}){where} "
            "or a hub id already in the server's Hugging Face cache",
            code="model_not_found",
            param="model",
        )
    return found


def _config(name: str, path: str | Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        # The reason stays in the log: a tenant learns nothing about the files behind a name.
        log.warning("model %r: unreadable config in %s: %s", name, path, exc)
        raise UserError(f"model {name!r} has no usable config.json", code="model_invalid", param="model") from None


def load_processor(name: str, settings: Settings | None = None) -> tuple[ModelFamily, Any]:
    """The family and the processor (with the family's chat template) of a model, without its weights."""
    path = resolve_model(name, settings)
    family = family_for(_config(name, path).model_type)
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
    name: str,
    settings: Settings | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    adapter: str | Path | None = None,
) -> ModelHandle:
    """Load a model, its processor and its family, offline.

    Args:
        name: a built-in model (`BUILTINS`: tiny-llava, tiny-llava-hf, tiny-qwen2.5-vl, ...), a
            folder name under MIADPO_MODELS_DIR, or a hub id already in the local cache (`resolve_model`).
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
    path = resolve_model(name, settings)
    family = family_for(_config(name, path).model_type)
    placement = {"device_map": str(device)} if device.type != "cpu" else {}
    model = family.load_model(
        path, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True, **placement
    )
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), local_files_only=True).merge_and_unload()
    model.eval()
    processor = family.load_processor(path, local_files_only=True)
    return ModelHandle(name=name, model=model, processor=processor, family=family)


@dataclass(frozen=True)
class ModelShape:
    """What a request can be checked against without a GPU nor weights: from the config, on the meta device."""

    lora_modules: tuple[str, ...]  # names of the modules LoRA can wrap (Linear, Embedding, Conv)
    min_image_tokens: int  # fewest tokens one image takes in a prompt


@lru_cache(maxsize=16)
def _shape_of(path: str) -> ModelShape:
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    family_for(config.model_type)  # an unsupported family is refused before anything is built
    with torch.device("meta"):  # module names only: no memory, no weights read
        model = AutoModelForImageTextToText.from_config(config)
    wrappable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    names = tuple(n for n, m in model.named_modules() if isinstance(m, wrappable))
    vision = config.vision_config
    # LLaVA: a fixed grid of patches per image; Qwen2-VL family: at least a 2x2 grid of merged patches
    # (the processor's min_pixels floor).
    tokens = (vision.image_size // vision.patch_size) ** 2 if getattr(vision, "image_size", None) else 4
    return ModelShape(lora_modules=names, min_image_tokens=max(1, tokens))


def model_shape(name: str, settings: Settings | None = None) -> ModelShape:
    """The `ModelShape` of a model (see `resolve_model` for what `name` may be); cached per folder."""
    path = resolve_model(name, settings)
    _config(name, path)  # a folder without a usable config is refused with a clear message
    return _shape_of(str(path))
