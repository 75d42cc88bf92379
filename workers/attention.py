"""How much a candidate answer looks at the target image (DESIGN 2.4).

For a (prompt, candidate) pair we read, in chosen layers of the language model, the attention from the
candidate's query rows to every image token, averaged over heads, layers and rows; the ratios below turn
them into the per-format score. Which rows (`attention_rows`, a selection setting):

- `answer_tokens`: the rows *at* the answer's tokens 0..T-1, as the official code reads them
  (`generate(output_attentions=True).attentions[1:]`);
- `producing`: the rows that *produce* tokens 0..T-1 (the prompt's last row, then tokens 0..T-2): the
  rows whose outputs are the answer's token log-probabilities. For a one-token answer their value does
  not depend on the answer at all.

Both are computed together (T + 1 rows cover them). A candidate's tokens are the answer proper:
whitespace the model wrote before or after it (a leading space token) is not part of the answer
(`workers.generate.split_answer`); it still stands in the sequence, between the prompt and the answer,
exactly as the model generated it and as training renders it.

No L x L matrix is ever built. The language model runs with the attention function registered
here as "miadpo": it computes each layer's output with transformers' sdpa, and only when a
recorder is active and the layer is selected, also softmax(q_rows K^T * scale + mask_rows) for
the recorder's query rows alone. The same function serves two callers:

- `probe`: one forward pass over prompt + lead + candidate, several candidates per pass (for backends
  that return no attention: vllm, openai; and for an hf candidate cut at `max_new_tokens`, whose last
  row at an answer token generation never computed);
- `GenerationRecording`: during `generate` itself (hf backend) every step computes exactly one
  row per sequence (prefill: the prompt's last row; then each decode step's row), which are the
  same rows; the token log-probabilities come from the same steps' logits. No second pass.

Perplexities: the paper's post-selection statistic is exp(-mean log p(token)); the official code's gate
uses exp(-mean log max-softmax) over the steps producing the answer and the EOS step. Both come from the
same logits.
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
ROWS = ("answer_tokens", "producing")  # attention_rows settings; see the module docstring
# Upper bound on one chunk of attention scores (elements), so long candidates do not spike memory.
_SCORE_CHUNK_ELEMENTS = 1 << 26


@dataclass
class ProbeResult:
    """What the attention stage needs about one (prompt, candidate) pair.

    `attention[rows]` holds one value per image token (images concatenated in prompt order): the
    softmax probability mass the candidate's query rows put on that token, averaged over heads,
    selected layers and rows, for each `attention_rows` setting that was computed (generation cannot
    give `answer_tokens` for a candidate cut at max_new_tokens). `image_spans` are the images' [start,
    end) token positions in the prompt (unpadded); `layouts` say which pixels each image's tokens see.
    `token_logprobs` and `max_logprobs` are, per answer token, the log-probability of that token and the
    largest log-probability at the step producing it; `next_max_logprob` is the largest one at the step
    after the answer (the EOS step of an answer that stopped), when it was computed.
    """

    attention: dict[str, np.ndarray]
    image_token_counts: tuple[int, ...]
    image_spans: tuple[tuple[int, int], ...]
    patch_grids: tuple[tuple[int, int], ...]
    layouts: tuple[TokenLayout, ...]
    token_logprobs: np.ndarray
    layers: tuple[int, ...]
    max_logprobs: np.ndarray | None = None
    next_max_logprob: float | None = None

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

    def official_perplexity(self, stopped: bool) -> float:
        """The official code's perplexity: exp(-mean log max-softmax) over the steps producing the answer,
        plus the EOS step when the answer `stopped` (and that step was computed); nan for an empty answer."""
        if self.num_tokens == 0 or self.max_logprobs is None:
            return math.nan
        steps = list(self.max_logprobs)
        if stopped and self.next_max_logprob is not None:
            steps.append(self.next_max_logprob)
        return float(np.exp(-np.mean(steps)))

    def values(self, rows: str) -> np.ndarray:
        """The per-image-token attention of the `rows` setting (KeyError when it was not computed)."""
        if rows not in ROWS:
            raise ValueError(f"attention_rows must be one of {ROWS}, got {rows!r}")
        return self.attention[rows]

    def image(self, index: int, rows: str) -> np.ndarray:
        """The attention values of image `index`'s tokens."""
        if not 0 <= index < len(self.image_token_counts):
            raise IndexError(f"image index {index} out of range for {len(self.image_token_counts)} images")
        start = sum(self.image_token_counts[:index])
        return self.values(rows)[start : start + self.image_token_counts[index]]


# -- ratios ---------------------------------------------------------------------------------------


def sequence_ratio(result: ProbeResult, target_index: int, rows: str) -> float:
    """Attention on the target image's tokens / attention on all image tokens (nan if none)."""
    total = float(result.values(rows).sum())
    return float(result.image(target_index, rows).sum()) / total if total > 0 else math.nan


def region_ratio(
    result: ProbeResult, image_index: int, image_size: tuple[int, int], box: Sequence[float], rows: str
) -> float:
    """Attention on the tokens inside `box` / attention on all of that image's tokens (nan if none).

    `box` is (left, top, right, bottom) in the pixels of the image the model was given, of size
    `image_size` (width, height), as the model was given it (padded: `ModelFamily.fit_images`). Each token counts with the fraction of its pixel footprint inside
    the box, mapped exactly through the processor's resize, crop and pad (`region_weights`); tokens
    on padding or cropped away count for nothing in the numerator, every token in the denominator.
    """
    layout = result.layouts[image_index]
    if tuple(image_size) != tuple(layout.image_size):
        raise ValueError(
            f"image_size {tuple(image_size)} differs from the probed image's {layout.image_size}"
        )
    values = result.image(image_index, rows)
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
    *,
    rows: str,
) -> float:
    """The format's ratio: `sequence_ratio`, or `region_ratio` of the single collage image.

    Args:
        result: the probe of the candidate.
        format: "sequence", "grid" or "pic_in_pic".
        target_index: 0-based index of the target image (sequence) or cell (unused for pic_in_pic).
        image_size: (width, height) of the collage as the model was given it (grid, pic_in_pic).
        box: the target cell or inset in that image's pixels (grid, pic_in_pic).
        rows: the `attention_rows` setting.
    """
    if format == "sequence":
        return sequence_ratio(result, target_index, rows)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if image_size is None or box is None:
        raise ValueError(f"format {format!r} needs image_size and box")
    if len(result.image_token_counts) != 1:
        raise ValueError(
            f"format {format!r} expects one image, the probe has {len(result.image_token_counts)}"
        )
    return region_ratio(result, 0, image_size, box, rows)


# -- the recording attention function -------------------------------------------------------------


class _Recorder:
    """Accumulates selected layers' attention from selected query rows to the image keys.

    `keys` (B, K) are the image-token positions of each row (padded coordinates), `key_valid` masks
    the padding of that table. With `rows` (B, R) the recorder sums, for each named set of those rows
    (`row_sets`: name -> (B, R) bool), the set's rows of one forward pass into `totals[name]`; without,
    it takes the last row of every call (generation) and keeps one (B, K) sum per step in `steps`.
    """

    def __init__(
        self,
        layers: Sequence[int],
        keys: torch.Tensor,
        key_valid: torch.Tensor,
        rows: torch.Tensor | None = None,
        row_sets: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.layers = frozenset(layers)
        self.keys, self.key_valid = keys, key_valid
        self.rows, self.row_sets = rows, row_sets or {}
        self.totals = {
            name: torch.zeros(keys.shape, dtype=torch.float64, device=keys.device) for name in self.row_sets
        }
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
        kv_len = key.shape[2]
        chunk = max(1, _SCORE_CHUNK_ELEMENTS // max(1, batch * heads * kv_len))
        for start in range(0, self.rows.shape[1], chunk):
            rows = self.rows[:, start : start + chunk]
            probs = _row_probs(query, key, attention_mask, rows, self.keys, scale, causal)
            probs = torch.where(self.key_valid[:, None, :], probs.double(), 0.0)
            for name, members in self.row_sets.items():
                weight = members[:, start : start + chunk, None].to(probs.dtype)
                self.totals[name] += (probs * weight).sum(dim=1)


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
    enc: EncodedBatch,
    row: int,
    attention: dict[str, np.ndarray],
    logprobs: np.ndarray,
    layers: tuple[int, ...],
    max_logprobs: np.ndarray,
    next_max_logprob: float | None,
) -> ProbeResult:
    pad = enc.pad[row]
    return ProbeResult(
        attention=attention,
        image_token_counts=tuple(end - start for start, end in enc.image_spans[row]),
        image_spans=tuple((start - pad, end - pad) for start, end in enc.image_spans[row]),
        patch_grids=tuple(layout.grid for layout in enc.layouts[row]),
        layouts=tuple(enc.layouts[row]),
        token_logprobs=logprobs,
        layers=layers,
        max_logprobs=max_logprobs,
        next_max_logprob=next_max_logprob,
    )


def _empty_attention(n_keys: int) -> dict[str, np.ndarray]:
    return {rows: np.zeros(n_keys) for rows in ROWS}


# -- the separate probe pass ----------------------------------------------------------------------


def probe(
    handle: ModelHandle,
    prompts: Sequence[Any],
    candidates: Sequence[Sequence[int]],
    layers: Sequence[int] | None = None,
    batch_size: int = 4,
    leads: Sequence[Sequence[int]] | None = None,
) -> list[ProbeResult]:
    """Attention of each candidate to its prompt's image tokens, and its token log-probabilities.

    Args:
        handle: the loaded model (its language model is switched to the recording attention).
        prompts: PromptInput-like items (`.prompt` with `<image>` placeholders, `.images`).
        candidates: the candidates' answer token ids, one per prompt, without EOS or padding.
        layers: language-model layers to average over (default: the middle layer).
        batch_size: (prompt, candidate) pairs per forward pass.
        leads: per candidate, the tokens the model wrote before its answer proper (a leading space):
            they stand between the prompt and the answer, and no row reads them as answer tokens.
    Returns:
        One ProbeResult per pair, in order, with both `attention_rows` settings.
    """
    if len(prompts) != len(candidates):
        raise ValueError(f"got {len(candidates)} candidates for {len(prompts)} prompts")
    if leads is not None and len(leads) != len(candidates):
        raise ValueError(f"got {len(leads)} leads for {len(candidates)} candidates")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chosen = handle.resolve_layers(layers)
    install(handle.model)
    leads = leads if leads is not None else [()] * len(candidates)
    results: list[ProbeResult] = []
    for start in range(0, len(prompts), batch_size):
        stop = start + batch_size
        results.extend(
            _probe_batch(handle, prompts[start:stop], candidates[start:stop], leads[start:stop], chosen)
        )
    return results


def _probe_batch(
    handle: ModelHandle,
    prompts: Sequence[Any],
    candidates: Sequence[Sequence[int]],
    leads: Sequence[Sequence[int]],
    layers: tuple[int, ...],
) -> list[ProbeResult]:
    sequences = [[*lead, *cand] for lead, cand in zip(leads, candidates, strict=True)]
    enc = handle.family.encode(handle.processor, prompts, sequences)
    inputs = _model_inputs(handle, enc)
    device = handle.device
    length = enc.seq_len
    counts = [len(c) for c in candidates]
    # Rows t = 0 .. T_b of pair b (left padding: the answer ends the row): position length - T_b - 1 + t.
    # Rows 0 .. T_b-1 produce answer tokens 0 .. T_b-1; rows 1 .. T_b stand at them.
    n_rows = max(counts) + 1
    offsets = torch.arange(n_rows)
    lengths = torch.tensor(counts)
    row_valid = offsets[None, :] <= lengths[:, None]
    rows = torch.where(row_valid, length - lengths[:, None] - 1 + offsets[None, :], length - 1)
    row_sets = {
        "producing": offsets[None, :] < lengths[:, None],
        "answer_tokens": (offsets[None, :] >= 1) & row_valid,
    }
    keys, key_valid = _key_table(enc)
    recorder = _Recorder(
        layers, keys.to(device), key_valid.to(device), rows.to(device), {k: v.to(device) for k, v in row_sets.items()}
    )

    kwargs: dict[str, Any] = {"use_cache": False, "logits_to_keep": n_rows}
    position_ids = handle.family.position_ids(inputs)
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    with torch.inference_mode(), _recording(recorder):
        logits = handle.model(**inputs, **kwargs).logits  # positions length - n_rows .. length - 1
    totals = {name: total.cpu().numpy() for name, total in recorder.totals.items()}

    results = []
    for b, count in enumerate(counts):
        n_keys = sum(end - start for start, end in enc.image_spans[b])
        steps = logits[b, n_rows - count - 1 :].float().log_softmax(-1)  # count + 1 steps
        best = steps.max(dim=-1).values.double().cpu().numpy()
        if count:
            ids = torch.tensor(list(candidates[b]), device=steps.device)
            logprobs = steps[:count].gather(1, ids[:, None])[:, 0].double().cpu().numpy()
            attention = {name: total[b, :n_keys] / (len(layers) * count) for name, total in totals.items()}
        else:
            logprobs, attention = np.zeros(0), _empty_attention(n_keys)
        results.append(_result(enc, b, attention, logprobs, layers, best[:count], float(best[count])))
    return results


# -- recording during generation ------------------------------------------------------------------


class GenerationRecording:
    """Records, while `model.generate` runs, exactly what `probe` would compute afterwards.

    Use as a context manager around one `generate` call on `enc` (with `num_return_sequences`
    = `repeat`); then `results(new_tokens, spans)` gives one ProbeResult per returned sequence, its
    answer being generated tokens [start, stop) (rows after a sequence has finished are recorded but
    ignored). Step s of generation computes the row producing token s, which is also the row at token
    s - 1: an answer's `answer_tokens` rows need the step after its last token, which generation only
    ran if it produced a token there (EOS, or trailing whitespace); without it that setting is absent.
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
        self._max_logprobs: list[torch.Tensor] = []
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
        self._max_logprobs.append(self._last.max(dim=-1).values)

    def results(self, new_tokens: torch.Tensor, spans: Sequence[tuple[int, int]]) -> list[ProbeResult]:
        """ProbeResults for the generated `new_tokens` (B*repeat, S), candidate i's answer being tokens
        spans[i] = [start, stop) of its row (whitespace before and after the answer left out)."""
        steps = new_tokens.shape[1]
        if len(self._logprobs) < steps and self._last is not None:
            last = new_tokens[:, len(self._logprobs)].to(self._last.device)
            self._logprobs.append(self._last.gather(1, last[:, None])[:, 0])
        logprobs = torch.stack(self._logprobs[:steps], dim=1).double().cpu().numpy() if steps else None
        best = torch.stack(self._max_logprobs[:steps], dim=1).double().cpu().numpy() if steps else None
        per_step = torch.stack(self._recorder.steps[:steps]).cpu().numpy() if steps else None
        norm = len(self.layers)
        results = []
        for i, (start, stop) in enumerate(spans):
            b = i // self.repeat
            n_keys = sum(end - s for s, end in self.enc.image_spans[b])
            count = stop - start
            if count and per_step is not None and logprobs is not None and best is not None:
                attention = {"producing": per_step[start:stop, i, :n_keys].sum(axis=0) / (norm * count)}
                if stop < steps:
                    attention["answer_tokens"] = per_step[start + 1 : stop + 1, i, :n_keys].sum(axis=0) / (norm * count)
                token_logprobs, max_logprobs = logprobs[i, start:stop].copy(), best[i, start:stop].copy()
                next_max = float(best[i, stop]) if stop < steps else None
            else:
                attention, token_logprobs, max_logprobs = _empty_attention(n_keys), np.zeros(0), np.zeros(0)
                next_max = float(best[i, stop]) if best is not None and stop < steps else None
            results.append(_result(self.enc, b, attention, token_logprobs, self.layers, max_logprobs, next_max))
        return results
