"""Built-in models (DESIGN 4, 6): names that need no download.

Each family module lists its built-in models (`BUILTINS`): tiny randomly initialised ones, built
offline from a config and seeded, and trained ones whose weights ship with the package. This module
holds what they share: the registry entry, a byte-level tokenizer made in code, and the one-time,
concurrency-safe build into `{data_dir}/models/{name}` (build into a temporary directory, then rename
it into place: a worker sees either no model or a complete one, and when two build at once the loser
drops its copy).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

TINY_SEED = 0
_COMPLETE = "config.json"  # a target directory only ever appears complete (renamed into place)


def byte_level_tokenizer(
    special_tokens: Sequence[str],
    *,
    bos_token: str | None = None,
    eos_token: str,
    pad_token: str,
    unk_token: str | None = None,
    add_bos: bool = False,
) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per byte (256) plus `special_tokens`; no download, no merges.

    Any text round-trips (byte-level), special tokens are never split, and `add_bos` prepends the
    BOS token as LLaMA-style tokenizers do.
    """
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    if add_bos:
        if bos_token is None:
            raise ValueError("add_bos needs a bos_token")
        bos_id = tokenizer.token_to_id(bos_token)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, bos_id)],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=unk_token,
        padding_side="left",
    )


@dataclass(frozen=True)
class BuiltinModel:
    """A model name that resolves without a download: built from code on first use, or shipped."""

    name: str
    family: str  # the `ModelFamily.name` it belongs to
    description: str
    build: Callable[[Path, int], None] | None = None  # writes a seeded random model + processor into a folder
    packaged: Path | None = None  # a folder inside the package holding trained weights + processor

    def __post_init__(self) -> None:
        if (self.build is None) == (self.packaged is None):
            raise ValueError(f"built-in model {self.name!r} needs exactly one of build and packaged")


# What a model name may look like: a name or an `org/name` hub id. Every segment starts with a letter or a
# digit, so no name is absolute, holds `..`, or leaves the folder it is looked up in.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(?:/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?")


def operator_model(name: str, models_dir: Path | None) -> Path | None:
    """`{models_dir}/{name}` when the operator put a model folder there (it has a config.json), else None."""
    if models_dir is None or not MODEL_NAME.fullmatch(name):
        return None
    path = Path(models_dir) / name
    return path if (path / _COMPLETE).is_file() else None


def cached_hub_model(name: str) -> Path | None:
    """The snapshot folder of hub id `name` when the local Hugging Face cache holds its config, else None.
    Never a download: the cache is only looked at."""
    if not MODEL_NAME.fullmatch(name):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, _COMPLETE)
    except Exception:  # an id the hub refuses (HFValidationError), an unreadable cache: not there
        return None
    return Path(found).parent if isinstance(found, str) else None


def builtin_path(name: str, data_dir: Path) -> Path:
    return Path(data_dir) / "models" / name


def ensure_builtin(model: BuiltinModel, data_dir: Path, seed: int = TINY_SEED) -> Path:
    """The folder of a built-in model: the packaged one, or `{data_dir}/models/{name}`, built on first use."""
    if model.packaged is not None:
        return model.packaged
    assert model.build is not None
    target = builtin_path(model.name, data_dir)
    if (target / _COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=target.parent))
    try:
        model.build(staging, seed)
        try:
            os.rename(staging, target)
        except OSError:
            # Someone else finished first (target exists and is not empty): theirs is as good as ours.
            if not (target / _COMPLETE).is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
