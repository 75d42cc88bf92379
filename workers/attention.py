"""How much a candidate answer looks at the target image (DESIGN 2.4).

For a (prompt, candidate) pair we read, in chosen layers of the language model, the attention from
the query rows that produce the candidate to every image token: the rows at positions P-1 ..
P+T-2 for a prompt of P tokens and a candidate of T tokens (the rows whose outputs predict the
candidate's tokens, which are also the rows giving its token log-probabilities). The values are
averaged over heads, layers and rows; the ratios below turn them into the per-format score.

No L x L matrix is ever built. The language model runs with the attention function registered
here as "miadpo": it computes each layer's output with transformers' sdpa, and only when a
recorder is active and the layer is selected, also softmax(q_rows K^T * scale + mask_rows) for
the recorder's query rows alone. The same function serves two callers:

- `probe`: one forward pass over prompt + candidate, several candidates per pass (for backends
  that return no attention: vllm, openai);
- `GenerationRecording`: during `generate` itself (hf backend) every step computes exactly one
  row per sequence (prefill: the prompt's last row; then each decode step's row), which are the
  same rows; the token log-probabilities come from the same steps' logits. No second pass.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from workers.models.base import EncodedBatch, ModelHandle, TokenLayout, region_weights

ATTN_IMPLEMENTATION = "miadpo"
FORMATS = ("sequence", "grid", "pic_in_pic")
# Upper bound on one chunk of attention scores (elements), so long candidates do not spike memory.
_SCORE_CHUNK_ELEMENTS = 1 << 26


@dataclass
class ProbeResult:
    """What the attention stage needs about one (prompt, candidate) pair.

    `image_attention` holds one value per image token (images concatenated in prompt order): the
    softmax probability mass the candidate's query rows put on that token, averaged over heads,
    selected layers and rows. `image_spans` are the images' [start, end) token positions in the
    prompt (unpadded); `layouts` say which pixels each image's tokens see.
    """

    image_attention: np.ndarray
    image_token_counts: tuple[int, ...]
    image_spans: tuple[tuple[int, int], ...]
    patch_grids: tuple[tuple[int, int], ...]
    layouts: tuple[TokenLayout, ...]
    token_logprobs: np.ndarray
    layers: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        """Candidate tokens (query rows) the values average over."""
        return int(self.token_logprobs.shape[0])

    @property
    def perplexity(self) -> float:
        """exp(-mean token log-probability); nan for an empty candidate."""
        if self.num_tokens == 0:
            return math.nan
        return float(np.exp(-self.token_logprobs.mean()))

    def image(self, index: int) -> np.ndarray:
        """The attention values of image `index`'s tokens."""
        if not 0 <= index < len(self.image_token_counts):
            raise IndexError(f"image index {index} out of range for {len(self.image_token_counts)} images")
        start = sum(self.image_token_counts[:index])
        return self.image_attention[start : start + self.image_token_counts[index]]


# -- ratios ---------------------------------------------------------------------------------------


def sequence_ratio(result: ProbeResult, target_index: int) -> float:
    """Attention on the target image's tokens / attention on all image tokens (nan if none)."""
    total = float(result.image_attention.sum())
    return float(result.image(target_index).sum()) / total if total > 0 else math.nan


def region_ratio(
    result: ProbeResult, image_index: int, image_size: tuple[int, int], box: Sequence[float]
) -> float:
    """Attention on the tokens inside `box` / attention on all of that image's tokens (nan if none).

    `box` is (left, top, right, bottom) in the pixels of the image the model was given, of size
    `image_size` (width, height). Each token counts with the fraction of its pixel footprint inside
    the box, mapped exactly through the processor's resize, crop and pad (`region_weights`); tokens
    on padding or cropped away count for nothing in the numerator, every token in the denominator.
    """
    layout = result.layouts[image_index]
    if tuple(image_size) != tuple(layout.image_size):
        raise ValueError(
            f"image_size {tuple(image_size)} differs from the probed image's {layout.image_size}"
        )
    values = result.image(image_index)
    total = float(values.sum())
    if total <= 0:
        return math.nan
    return float(values @ region_weights(layout, box)) / total


def recipe_ratio(
    result: ProbeResult,
    format: str,
    target_index: int,
    image_size: tuple[int, int] | None = None,
    box: Sequence[float] | None = None,
) -> float:
    """The format's ratio: `sequence_ratio`, or `region_ratio` of the single collage image.

    Args:
        result: the probe of the candidate.
        format: "sequence", "grid" or "pic_in_pic".
        target_index: 0-based index of the target image (sequence) or cell (unused for pic_in_pic).
        image_size: (width, height) of the rendered collage (grid, pic_in_pic).
        box: the target cell or inset in that image's pixels (grid, pic_in_pic).
    """
    if format == "sequence":
        return sequence_ratio(result, target_index)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if image_size is None or box is None:
        raise ValueError(f"format {format!r} needs image_size and box")
    if len(result.image_token_counts) != 1:
        raise ValueError(
            f"format {format!r} expects one image, the probe has {len(result.image_token_counts)}"
        )
    return region_ratio(result, 0, image_size, box)


# -- the recording attention function -------------------------------------------------------------


class _Recorder:
    """Accumulates selected layers' attention from selected query rows to the image keys.

    `keys` (B, K) are the image-token positions of each row (padded coordinates), `key_valid` masks
    the padding of that table. With `rows` (B, R) the recorder sums the R rows of one forward pass
    into `totals`; without, it takes the last row of every call (generation) and keeps one (B, K)
    sum per step in `steps`.
    """

    def __init__(
        self,
        layers: Sequence[int],
        keys: torch.Tensor,
        key_valid: torch.Tensor,
        rows: torch.Tensor | None = None,
        row_valid: torch.Tensor | None = None,
    ) -> None:
        self.layers = frozenset(layers)
        self.keys, self.key_valid = keys, key_valid
        self.rows, self.row_valid = rows, row_valid
        self.totals = torch.zeros(keys.shape, dtype=torch.float64, device=keys.device)
        self.steps: list[torch.Tensor] = []
        self._calls: dict[int, int] = {}

    def observe(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
        is_causal: bool | None,
    ) -> None:
        layer = getattr(module, "layer_idx", None)
        if layer not in self.layers:
            return
        batch, heads, q_len, head_dim = query.shape
        scale = head_dim**-0.5 if scaling is None else scaling
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        # sdpa's own rule: without a mask, a multi-row call is causal (upper-left aligned, which
        # also covers its slicing of keys to q_len), a single row sees every key.
        causal = bool(causal) and attention_mask is None and q_len > 1
        if self.rows is None:
            rows = torch.full((batch, 1), q_len - 1, dtype=torch.long, device=query.device)
            probs = _row_probs(query, key, attention_mask, rows, self.keys, scale, causal)[:, 0]
            step = self._calls.get(layer, 0)
            self._calls[layer] = step + 1
            if step == len(self.steps):
                self.steps.append(torch.zeros(self.keys.shape, dtype=torch.float64, device=query.device))
            self.steps[step] += torch.where(self.key_valid, probs.double(), 0.0)
            return
        assert self.row_valid is not None
        kv_len = key.shape[2]
        chunk = max(1, _SCORE_CHUNK_ELEMENTS // max(1, batch * heads * kv_len))
        for start in range(0, self.rows.shape[1], chunk):
            rows, valid = self.rows[:, start : start + chunk], self.row_valid[:, start : start + chunk]
            probs = _row_probs(query, key, attention_mask, rows, self.keys, scale, causal)
            probs = torch.where(valid[:, :, None] & self.key_valid[:, None, :], probs.double(), 0.0)
            self.totals += probs.sum(dim=1)


def _row_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """Head-averaged softmax probabilities of query `rows` (B, R) on key positions `keys` (B, K)."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    n_rows = rows.shape[1]
    q = query.gather(2, rows[:, None, :, None].expand(batch, heads, n_rows, head_dim))
    # Grouped-query attention without repeating K: query head h uses key head h // groups.
    q = q.reshape(batch, kv_heads, (heads // kv_heads) * n_rows, head_dim)
    # Scores in the model's dtype (as eager attention; no float copy of the whole K cache), softmax in float32.
    scores = torch.matmul(q, key.transpose(-1, -2)).float().mul_(scale).view(batch, heads, n_rows, kv_len)
    if attention_mask is not None:
        mask = attention_mask.expand(batch, -1, q_len, kv_len)  # masks may broadcast over batch or rows
        mask = mask.gather(2, rows[:, None, :, None].expand(batch, mask.shape[1], n_rows, kv_len))
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    elif causal:
        allowed = torch.arange(kv_len, device=query.device)[None, None, :] <= rows[:, :, None]
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).mean(dim=1)  # (B, R, kv)
    return probs.gather(2, keys[:, None, :].expand(batch, n_rows, keys.shape[1]))


_ACTIVE: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar(
    "miadpo_attention_recorder", default=None
)


def miadpo_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa attention that also feeds the active recorder (q/k arrive with rope, mrope included)."""
    recorder = _ACTIVE.get()
    if recorder is not None:
        recorder.observe(module, query, key, attention_mask, scaling, is_causal)
    return sdpa_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        **kwargs,
    )


AttentionInterface.register(ATTN_IMPLEMENTATION, miadpo_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def install(model: Any) -> None:
    """Run the language model's attention through the recording function (vision tower untouched)."""
    config = model.config
    text_config = getattr(config, "text_config", config)
    if text_config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation({"text_config": ATTN_IMPLEMENTATION})


@contextmanager
def _recording(recorder: _Recorder) -> Iterator[_Recorder]:
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)


def _key_table(enc: EncodedBatch, repeat: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(B*repeat, K) image-token positions per row, and which entries are real."""
    positions = [enc.image_positions(b) for b in range(len(enc.pad))]
    width = max(1, max(len(p) for p in positions))
    keys = torch.zeros(len(positions), width, dtype=torch.long)
    valid = torch.zeros(len(positions), width, dtype=torch.bool)
    for b, pos in enumerate(positions):
        keys[b, : len(pos)] = torch.tensor(pos, dtype=torch.long)
        valid[b, : len(pos)] = True
    return keys.repeat_interleave(repeat, dim=0), valid.repeat_interleave(repeat, dim=0)


def _model_inputs(handle: ModelHandle, enc: EncodedBatch) -> dict[str, torch.Tensor]:
    device, dtype = handle.device, handle.model.dtype
    return {
        k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
        for k, v in enc.inputs.items()
    }


def _result(
    enc: EncodedBatch, row: int, values: np.ndarray, logprobs: np.ndarray, layers: tuple[int, ...]
) -> ProbeResult:
    pad = enc.pad[row]
    return ProbeResult(
        image_attention=values,
        image_token_counts=tuple(end - start for start, end in enc.image_spans[row]),
        image_spans=tuple((start - pad, end - pad) for start, end in enc.image_spans[row]),
        patch_grids=tuple(layout.grid for layout in enc.layouts[row]),
        layouts=tuple(enc.layouts[row]),
        token_logprobs=logprobs,
        layers=layers,
    )


# -- the separate probe pass ----------------------------------------------------------------------


def probe(
    handle: ModelHandle,
    prompts: Sequence[Any],
    candidates: Sequence[Sequence[int]],
    layers: Sequence[int] | None = None,
    batch_size: int = 4,
) -> list[ProbeResult]:
    """Attention of each candidate to its prompt's image tokens, and its token log-probabilities.

    Args:
        handle: the loaded model (its language model is switched to the recording attention).
        prompts: PromptInput-like items (`.prompt` with `<image>` placeholders, `.images`).
        candidates: the candidates' token ids, one per prompt, without EOS or padding.
        layers: language-model layers to average over (default: the middle layer).
        batch_size: (prompt, candidate) pairs per forward pass.
    Returns:
        One ProbeResult per pair, in order.
    """
    if len(prompts) != len(candidates):
        raise ValueError(f"got {len(candidates)} candidates for {len(prompts)} prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chosen = handle.resolve_layers(layers)
    install(handle.model)
    results: list[ProbeResult] = []
    for start in range(0, len(prompts), batch_size):
        stop = start + batch_size
        results.extend(_probe_batch(handle, prompts[start:stop], candidates[start:stop], chosen))
    return results


def _probe_batch(
    handle: ModelHandle, prompts: Sequence[Any], candidates: Sequence[Sequence[int]], layers: tuple[int, ...]
) -> list[ProbeResult]:
    enc = handle.family.encode(handle.processor, prompts, candidates)
    inputs = _model_inputs(handle, enc)
    device = handle.device
    length, counts = enc.seq_len, enc.candidate_lengths
    n_rows = max(1, max(counts))
    # Row t of pair b predicts candidate token t: position length - T_b - 1 + t (left padding).
    offsets = torch.arange(n_rows)
    lengths = torch.tensor(counts)
    row_valid = offsets[None, :] < lengths[:, None]
    rows = torch.where(row_valid, length - lengths[:, None] - 1 + offsets[None, :], length - 1)
    keys, key_valid = _key_table(enc)
    recorder = _Recorder(layers, keys.to(device), key_valid.to(device), rows.to(device), row_valid.to(device))

    kwargs: dict[str, Any] = {"use_cache": False, "logits_to_keep": n_rows + 1}
    position_ids = handle.family.position_ids(inputs)
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    with torch.inference_mode(), _recording(recorder):
        logits = handle.model(**inputs, **kwargs).logits  # positions length - n_rows - 1 .. length - 1
    totals = recorder.totals.cpu().numpy()

    results = []
    for b, count in enumerate(counts):
        n_keys = sum(end - start for start, end in enc.image_spans[b])
        if count:
            picked = logits[b, n_rows - count : n_rows].float().log_softmax(-1)
            ids = torch.tensor(list(candidates[b]), device=picked.device)
            logprobs = picked.gather(1, ids[:, None])[:, 0].double().cpu().numpy()
            values = totals[b, :n_keys] / (len(layers) * count)
        else:
            logprobs, values = np.zeros(0), np.zeros(n_keys)
        results.append(_result(enc, b, values, logprobs, layers))
    return results


# -- recording during generation ------------------------------------------------------------------


class GenerationRecording:
    """Records, while `model.generate` runs, exactly what `probe` would compute afterwards.

    Use as a context manager around one `generate` call on `enc` (with `num_return_sequences`
    = `repeat`); then `results(new_tokens, lengths)` gives one ProbeResult per returned sequence,
    taking the first `lengths[i]` generated tokens as the candidate (rows after a sequence has
    finished are recorded but ignored).
    """

    def __init__(
        self, handle: ModelHandle, enc: EncodedBatch, layers: Sequence[int] | None = None, repeat: int = 1
    ):
        self.handle, self.enc, self.repeat = handle, enc, repeat
        self.layers = handle.resolve_layers(layers)
        keys, key_valid = _key_table(enc, repeat)
        device = handle.device
        self._recorder = _Recorder(self.layers, keys.to(device), key_valid.to(device))
        self._logprobs: list[torch.Tensor] = []
        self._last: torch.Tensor | None = None  # log-softmax of the latest step, token not yet known
        self._token: contextvars.Token[_Recorder | None] | None = None
        self._hook: Any = None

    def __enter__(self) -> GenerationRecording:
        install(self.handle.model)
        self._token = _ACTIVE.set(self._recorder)
        self._hook = self.handle.model.register_forward_hook(self._on_forward, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hook is not None:
            self._hook.remove()
        if self._token is not None:
            _ACTIVE.reset(self._token)

    def _on_forward(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        # Step s feeds token s-1: its log-probability comes from step s-1's logits.
        if self._last is not None:
            fed = kwargs["input_ids"][:, -1]
            self._logprobs.append(self._last.gather(1, fed[:, None].to(self._last.device))[:, 0])
        self._last = output.logits[:, -1].float().log_softmax(-1)

    def results(self, new_tokens: torch.Tensor, lengths: Sequence[int]) -> list[ProbeResult]:
        """ProbeResults for the generated `new_tokens` (B*repeat, S), candidate i being its first lengths[i]."""
        steps = new_tokens.shape[1]
        if len(self._logprobs) < steps and self._last is not None:
            last = new_tokens[:, len(self._logprobs)].to(self._last.device)
            self._logprobs.append(self._last.gather(1, last[:, None])[:, 0])
        logprobs = torch.stack(self._logprobs[:steps], dim=1).double().cpu().numpy() if steps else None
        per_step = torch.stack(self._recorder.steps[:steps]).cpu().numpy() if steps else None
        results = []
        for i, count in enumerate(lengths):
            b = i // self.repeat
            n_keys = sum(end - start for start, end in self.enc.image_spans[b])
            if count and per_step is not None and logprobs is not None:
                values = per_step[:count, i, :n_keys].sum(axis=0) / (len(self.layers) * count)
                token_logprobs = logprobs[i, :count].copy()
            else:
                values, token_logprobs = np.zeros(n_keys), np.zeros(0)
            results.append(_result(self.enc, b, values, token_logprobs, self.layers))
        return results
