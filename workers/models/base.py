"""What every model family provides, and the family-independent parts (DESIGN 2.3, 2.4).

A family knows four things about its models: the one chat template that turns a recipe's prompt
into the text the model was trained on (used by generation, the attention pass, training and the
vLLM server alike), how a rendered image is fitted before any processor sees it (LLaVA-1.5: padded
to a square), where each image's tokens sit in `input_ids` after the processor has expanded the
placeholders, and which pixels of the image each of those tokens sees (`TokenLayout`). Everything
else (batching with left padding, appending candidates, finding the spans) is shared and lives here.

Encoding never adds special tokens: a family's template writes its BOS itself, exactly as TRL's
collator (`add_special_tokens=False`) and vLLM's chat endpoint tokenize the same text, so the ids a
model generates from are the ids it is trained on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class TokenLayout:
    """Where one image's tokens look, in the pixel coordinates of the image given to the processor.

    The processor maps the original image to its input by an axis-aligned affine map (pad, resize,
    crop): `processed = original * scale + offset`. The model's tokens tile the processed image in a
    `rows x cols` grid, row-major, each token covering `cell` processed pixels (a 14 px patch for
    LLaVA-1.5, a merged 28 px block for Qwen2.5-VL). `leading_tokens` are tokens without a place in
    the image (a CLS token when the vision features keep it); they come before the grid.
    """

    image_size: tuple[int, int]  # (width, height) of the original image
    rows: int
    cols: int
    cell: tuple[float, float]  # (width, height) of one token's footprint, processed pixels
    scale: tuple[float, float]  # (x, y)
    offset: tuple[float, float]  # (x, y)
    leading_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return self.leading_tokens + self.rows * self.cols

    @property
    def grid(self) -> tuple[int, int]:
        return (self.rows, self.cols)


def region_weights(layout: TokenLayout, box: Sequence[float]) -> np.ndarray:
    """Fraction of each token's footprint that lies inside `box`, one value per image token.

    `box` is (left, top, right, bottom) in the original image's pixels. It is clipped to the image,
    mapped through the processor's affine map, and intersected with every token's footprint. A token
    half inside the box weighs 0.5; tokens on padding, and leading tokens, weigh 0. Because the map
    is affine per axis, the fraction is the same whether measured in processed or original pixels.
    """
    width, height = layout.image_size
    left, top, right, bottom = (float(v) for v in box)
    left, right = max(0.0, left), min(float(width), right)
    top, bottom = max(0.0, top), min(float(height), bottom)
    weights = np.zeros(layout.num_tokens, dtype=np.float64)
    if right <= left or bottom <= top:
        return weights
    (sx, sy), (ox, oy), (cw, ch) = layout.scale, layout.offset, layout.cell
    overlap_x = _overlap(left * sx + ox, right * sx + ox, cw, layout.cols)
    overlap_y = _overlap(top * sy + oy, bottom * sy + oy, ch, layout.rows)
    weights[layout.leading_tokens :] = np.outer(overlap_y, overlap_x).ravel()
    return weights


def _overlap(lo: float, hi: float, size: float, count: int) -> np.ndarray:
    """Fraction of each of `count` consecutive intervals of length `size` covered by [lo, hi]."""
    starts = np.arange(count, dtype=np.float64) * size
    covered = np.minimum(hi, starts + size) - np.maximum(lo, starts)
    return np.clip(covered, 0.0, None) / size


@dataclass
class EncodedBatch:
    """Model inputs for a batch of prompts (optionally followed by candidates), left padded.

    Positions are in padded coordinates: row `b` starts at `pad[b]`. `prompt_end[b]` is the first
    position after the prompt (where the candidate, if any, starts).
    """

    inputs: dict[str, torch.Tensor]
    pad: list[int]
    prompt_end: list[int]
    candidate_lengths: list[int]
    image_spans: list[list[tuple[int, int]]]  # per row, per image: [start, end) in padded coordinates
    layouts: list[list[TokenLayout]]  # per row, per image

    @property
    def seq_len(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    def image_positions(self, row: int) -> list[int]:
        """Positions of every image token of row `row`, images in prompt order."""
        return [p for start, end in self.image_spans[row] for p in range(start, end)]


class ModelFamily(ABC):
    """One family of vision-language models behind one interface.

    Subclasses set the class attributes and implement the abstract methods; the registry in
    `workers.models` picks a family from a checkpoint's `config.model_type`.
    """

    name: ClassVar[str]  # family name, e.g. "llava"
    model_types: ClassVar[tuple[str, ...]]  # config.model_type values this family handles
    # The conversation format of the family (jinja, as `processor.apply_chat_template` renders it):
    # set on every processor the family loads, whatever template the checkpoint ships.
    chat_template: ClassVar[str]
    # Inputs laid out along the sequence (left padded, extended by candidates) and their pad value.
    sequence_keys: ClassVar[dict[str, int]] = {"attention_mask": 0}

    # -- prompts ---------------------------------------------------------------------------------

    def messages(self, prompt: str) -> list[dict[str, Any]]:
        """Chat messages for a recipe prompt: text and image parts in the order of the `<image>`s."""
        content: list[dict[str, Any]] = []
        for i, text in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
            if i > 0:
                content.append({"type": "image"})
            if text:
                content.append({"type": "text", "text": text})
        return [{"role": "user", "content": content}]

    def chat_text(self, processor: Any, prompt: str) -> str:
        """The full text the model sees for one user turn, ending where the answer starts."""
        return processor.apply_chat_template(
            self.messages(prompt), add_generation_prompt=True, tokenize=False, chat_template=self.chat_template
        )

    def fit_images(
        self, processor: Any, images: Sequence[Image.Image]
    ) -> tuple[list[Image.Image], list[tuple[int, int]]]:
        """The images as the model is given them, and where each rendered image's (0, 0) lands in them.

        Every stage that hands images to the model or stores them for training calls this once on the
        rendered images (generation, the attention pass, the export), so all of them see the same pixels;
        a region of a rendered image (a grid cell, the inset) moves by the returned offset. The default
        is the images as they are.
        """
        return list(images), [(0, 0)] * len(images)

    def prepare_processor(self, processor: Any) -> Any:
        """The processor with the family's chat template (what TRL's collator and `chat_text` render)."""
        processor.chat_template = self.chat_template
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.chat_template = self.chat_template
        return processor

    # -- what a family must say about its models --------------------------------------------------

    @abstractmethod
    def load_model(self, path: str | Path, **kwargs: Any) -> torch.nn.Module:
        """The model from a local directory (or cached hub id), `from_pretrained` kwargs passed on."""

    @abstractmethod
    def load_processor(self, path: str | Path, **kwargs: Any) -> Any:
        """The processor (tokenizer + PIL image processor) from a local directory."""

    @abstractmethod
    def image_token_id(self, processor: Any) -> int:
        """The token id the processor repeats once per image token."""

    @abstractmethod
    def token_layouts(
        self, processor: Any, image_inputs: dict[str, Any], images: Sequence[Image.Image]
    ) -> list[TokenLayout]:
        """Layout of each image's tokens, from the processor output of one prompt and its images."""

    def placeholder_token_ids(self, processor: Any) -> list[int]:
        """Tokens that stand for image (or video) features: a candidate can never contain them."""
        return [self.image_token_id(processor)]

    def position_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Position ids matching what `generate` uses for left-padded rows (None: the model derives them)."""
        mask = inputs["attention_mask"].long()
        return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)

    # -- shared machinery -------------------------------------------------------------------------

    def encode(
        self,
        processor: Any,
        prompts: Sequence[Any],
        candidates: Sequence[Sequence[int]] | None = None,
    ) -> EncodedBatch:
        """Processor inputs for `prompts` (PromptInput-like: `.prompt`, `.images`), left padded.

        Each prompt goes through the processor on its own (so no row is padded before its
        candidate is appended); rows are then left padded to one length and the image tensors
        concatenated in row order, which is what one batched processor call would give.
        """
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        if candidates is not None and len(candidates) != len(prompts):
            raise ValueError(f"got {len(candidates)} candidates for {len(prompts)} prompts")
        token_id = self.image_token_id(processor)
        placeholders = set(self.placeholder_token_ids(processor))
        pad_id = processor.tokenizer.pad_token_id
        if pad_id is None:  # left padding is masked out: any id will do
            pad_id = processor.tokenizer.eos_token_id if processor.tokenizer.eos_token_id is not None else 0
        pad_values = {"input_ids": int(pad_id), **self.sequence_keys}

        rows: list[dict[str, torch.Tensor]] = []
        image_parts: list[dict[str, torch.Tensor]] = []
        layouts: list[list[TokenLayout]] = []
        prompt_lengths: list[int] = []
        cand_lengths: list[int] = []
        for i, item in enumerate(prompts):
            n_placeholders = item.prompt.count(IMAGE_PLACEHOLDER)
            if n_placeholders != len(item.images):
                raise ValueError(
                    f"prompt {getattr(item, 'uid', i)!r} has {n_placeholders} <image> placeholders "
                    f"but {len(item.images)} images"
                )
            text = self.chat_text(processor, item.prompt)
            images = list(item.images)
            # The template wrote the BOS (if the family has one): the tokenizer must not add another.
            out = processor(text=[text], images=images or None, return_tensors="pt", add_special_tokens=False)
            seq = {k: out[k][0] for k in pad_values if k in out}
            prompt_lengths.append(int(seq["input_ids"].shape[0]))
            cand = [int(t) for t in candidates[i]] if candidates is not None else []
            if placeholders.intersection(cand):
                raise ValueError(
                    f"candidate for prompt {getattr(item, 'uid', i)!r} contains an image placeholder token "
                    f"({sorted(placeholders.intersection(cand))}): the model cannot take it as text"
                )
            cand_lengths.append(len(cand))
            if cand:
                ext = torch.tensor(cand, dtype=seq["input_ids"].dtype)
                seq["input_ids"] = torch.cat([seq["input_ids"], ext])
                for k in seq:
                    if k != "input_ids":
                        fill = 1 if k == "attention_mask" else 0
                        seq[k] = torch.cat([seq[k], torch.full((len(cand),), fill, dtype=seq[k].dtype)])
            rows.append(seq)
            image_parts.append({k: v for k, v in out.items() if k not in pad_values})
            layouts.append(self.token_layouts(processor, out, images) if images else [])

        length = max(int(r["input_ids"].shape[0]) for r in rows)
        pad = [length - int(r["input_ids"].shape[0]) for r in rows]
        inputs: dict[str, torch.Tensor] = {}
        for key, value in pad_values.items():
            if key not in rows[0]:
                continue
            inputs[key] = torch.stack(
                [
                    torch.cat([torch.full((p,), value, dtype=r[key].dtype), r[key]])
                    for r, p in zip(rows, pad, strict=True)
                ]
            )
        for key in {k for part in image_parts for k in part}:
            tensors = [part[key] for part in image_parts if key in part]
            inputs[key] = torch.cat(tensors, dim=0)

        spans = [
            image_spans(inputs["input_ids"][b], token_id, [lay.num_tokens for lay in layouts[b]])
            for b in range(len(rows))
        ]
        return EncodedBatch(
            inputs=inputs,
            pad=pad,
            prompt_end=[p + n for p, n in zip(pad, prompt_lengths, strict=True)],
            candidate_lengths=cand_lengths,
            image_spans=spans,
            layouts=layouts,
        )


def image_spans(input_ids: torch.Tensor, token_id: int, counts: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each image's tokens in one row of `input_ids`, images in order.

    The image-token positions are split in order by the known per-image counts (two images with
    nothing between them form one run), and each piece must be contiguous.
    """
    positions = torch.nonzero(input_ids == token_id).flatten().tolist()
    if len(positions) != sum(counts):
        raise ValueError(f"found {len(positions)} image tokens, expected {sum(counts)} ({list(counts)})")
    spans: list[tuple[int, int]] = []
    at = 0
    for n in counts:
        piece = positions[at : at + n]
        if n < 1 or piece[-1] - piece[0] != n - 1:
            raise ValueError(f"image tokens of image {len(spans)} are not contiguous")
        spans.append((piece[0], piece[0] + n))
        at += n
    return spans


@dataclass
class ModelHandle:
    """A loaded model with its processor and family: what the generation and attention stages get."""

    name: str
    model: Any
    processor: Any
    family: ModelFamily

    @property
    def text_config(self) -> Any:
        config = self.model.config
        return getattr(config, "text_config", config)

    def answer_reader(self) -> Any:
        """A `workers.generate.AnswerReader` for this model's tokenizer."""
        from workers.generate import AnswerReader

        return AnswerReader(self.processor.tokenizer)

    @property
    def num_layers(self) -> int:
        """Layers of the language model."""
        return int(self.text_config.num_hidden_layers)

    @property
    def default_layers(self) -> tuple[int, ...]:
        """The middle layer of the language model (official code: layer 16 of 32)."""
        return (self.num_layers // 2,)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def resolve_layers(self, layers: Sequence[int] | None) -> tuple[int, ...]:
        """Validated, sorted, de-duplicated layer indices (negative counts from the end)."""
        if layers is None:
            return self.default_layers
        n = self.num_layers
        out = set()
        for layer in layers:
            index = int(layer) + n if int(layer) < 0 else int(layer)
            if not 0 <= index < n:
                raise ValueError(f"layers must be in [-{n}, {n}) for this model, got {layer}")
            out.add(index)
        if not out:
            raise ValueError("layers must not be empty")
        return tuple(sorted(out))
