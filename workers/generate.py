"""Candidate generation: one protocol, several backends (DESIGN 2.3).

A backend takes a batch of rendered prompts and returns, for each prompt, `num_candidates` answers
with their token ids. Backends that can (the in-process `hf` one) also return what the attention
stage needs, recorded during generation itself, so no second forward pass is needed for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image


@dataclass(frozen=True)
class GenerationConfig:
    """How candidates are sampled. Defaults follow the official code: greedy, one candidate, 512 tokens."""

    max_new_tokens: int = field(default=512, metadata={"help": "Most new tokens per candidate."})
    num_candidates: int = field(default=1, metadata={"help": "Candidates per prompt (>1 needs temperature > 0)."})
    temperature: float = field(default=0.0, metadata={"help": "0 means greedy decoding."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass when sampling."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate call (hf backend)."})

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {self.num_candidates}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.num_candidates > 1 and self.temperature == 0:
            raise ValueError("num_candidates > 1 needs temperature > 0 (greedy gives identical candidates)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


@dataclass
class PromptInput:
    """One rendered prompt: text with `<image>` placeholders and the images, in order."""

    uid: str
    prompt: str
    images: list[Image.Image]


@dataclass
class Candidate:
    """One generated answer.

    `probe` is filled only by backends that record attention during generation (hf): the same
    object the attention probe returns for (prompt, candidate), so the stages downstream do not care
    which path produced it.
    """

    text: str
    token_ids: list[int]
    finish_reason: str = "stop"  # stop | length
    probe: Any | None = None


@runtime_checkable
class GenerationBackend(Protocol):
    """Batch of prompts in, `num_candidates` candidates per prompt out (same order)."""

    name: str

    def generate(self, batch: Sequence[PromptInput], config: GenerationConfig) -> list[list[Candidate]]: ...

    def close(self) -> None: ...
