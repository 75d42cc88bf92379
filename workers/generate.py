"""Candidate generation: one protocol, several backends (DESIGN 2.3).

A backend takes a batch of rendered prompts and returns, for each prompt, `num_candidates` answers
with their token ids. Backends that can (the in-process `hf` one) also return what the attention
stage needs, recorded during generation itself, so no second forward pass is needed for them.

Every backend strips an answer once, right after decoding (`split_answer`): the text and the token
ids of a candidate are the answer proper, without the whitespace a tokenizer puts before it (" A green
triangle." -> "A green triangle."). Chosen and rejected then differ in what they say, never in
whitespace, which DPO would learn as a shortcut; the chat template puts the separator back the same way
for both when it renders an answer.
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
    """One prompt as the model gets it: text with `<image>` placeholders and the images, in order.

    `images` are fitted for the model (`ModelFamily.fit_images`: LLaVA pads them to squares);
    `offsets[k]` is where the rendered image k's (0, 0) lies in `images[k]`, so a region of the render
    (a grid cell, the inset) moves by it. Empty means no offsets.
    """

    uid: str
    prompt: str
    images: list[Image.Image]
    offsets: list[tuple[int, int]] = field(default_factory=list)

    def offset(self, index: int) -> tuple[int, int]:
        return self.offsets[index] if self.offsets else (0, 0)


@dataclass
class Candidate:
    """One generated answer.

    `text` and `token_ids` are the answer proper (`split_answer`); `lead_ids` are the tokens the model
    wrote before it (whitespace), which stand between the prompt and the answer in every forward pass.
    `probe` is filled only by backends that record attention during generation (hf): the same
    object the attention probe returns for (prompt, candidate), so the stages downstream do not care
    which path produced it.
    """

    text: str
    token_ids: list[int]
    finish_reason: str = "stop"  # stop | length
    probe: Any | None = None
    lead_ids: list[int] = field(default_factory=list)


def split_answer(tokenizer: Any, ids: Sequence[int]) -> tuple[int, int, str]:
    """Where the answer proper lies in generated token ids, and its text.

    Tokens at either end that decode to nothing but whitespace (or to nothing: special tokens) are not
    part of the answer. Returns [start, stop) into `ids` and the decoded answer, stripped.
    """
    ids = list(ids)

    def blank(token: int) -> bool:
        return not tokenizer.decode([token], skip_special_tokens=True).strip()

    start, stop = 0, len(ids)
    while start < stop and blank(ids[start]):
        start += 1
    while stop > start and blank(ids[stop - 1]):
        stop -= 1
    return start, stop, tokenizer.decode(ids[start:stop], skip_special_tokens=True).strip()


@dataclass(frozen=True)
class AnswerReader:
    """Turns what a backend decoded into a `Candidate` holding the answer proper (`split_answer`).

    Every backend reads its answers through one, with the model's own tokenizer, so that text, token
    ids and the tokens before the answer agree whichever backend generated them.
    """

    tokenizer: Any

    def from_ids(
        self, ids: Sequence[int], finish_reason: str = "stop", probe: Any = None, text: str | None = None
    ) -> Candidate:
        """From generated ids; `text` (stripped here) when the backend decoded them itself."""
        start, stop, decoded = split_answer(self.tokenizer, ids)
        ids = list(ids)
        answer = decoded if text is None else text.strip()
        return Candidate(answer, ids[start:stop], finish_reason, probe, lead_ids=ids[:start])

    def from_text(self, text: str, finish_reason: str = "stop") -> Candidate:
        """From text alone (a server that returns no token ids): the ids come from re-tokenising the text
        as it was written, whitespace before the answer included, so the lead is the model's own."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        return self.from_ids(ids, finish_reason, text=text)


@runtime_checkable
class GenerationBackend(Protocol):
    """Batch of prompts in, `num_candidates` candidates per prompt out (same order), each read through an
    `AnswerReader` (the answer proper, its token ids, the tokens before it)."""

    name: str

    def generate(self, batch: Sequence[PromptInput], config: GenerationConfig) -> list[list[Candidate]]: ...

    def close(self) -> None: ...
