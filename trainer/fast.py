"""The fast DPO step (DESIGN 5): reference log-probs computed once, the shared prompt computed once.

TRL's DPO step on a vision pair runs the model four times on two sequences that share their whole
prompt (policy and reference, each on [prompt, chosen] and [prompt, rejected]); with 4 LLaVA images the
prompt is ~2,400 tokens and the answers a few dozen. Two speed-ups, each optional, same objective:

- **Reference log-probs computed once** (`precompute_ref_logps`). With LoRA the reference is the base
  model with the adapter disabled, so its log-probs of every pair never change. TRL refuses
  `precompute_ref_log_probs` for vision data when its config is built, but its own routine
  (`_precompute_ref_logps`: one pass over the pair set, batched, adapter disabled, cached as dataset
  columns in the pair set's `datasets` cache, i.e. under the training's output folder, keyed by the
  pair set's and the reference weights' fingerprints) works once the refusal is bypassed; a resumed
  training finds the columns and does not recompute them. Its vision collator and its signature-column
  filter drop the `ref_*` columns: both are extended here to keep them.
- **The shared prompt computed once** (`fast_path`). One sequence per pair,
  `[prompt, chosen, copy of the last prompt token, rejected]`, under a 4-D attention mask: the chosen
  answer sees the prompt; the copy and the rejected answer see the prompt but not the chosen answer (nor
  the original last prompt token, which the copy replaces: same token, same position, same context, so
  the same keys and values). Positions restart after the prompt (explicit position ids; Qwen2.5-VL's 3-D
  rope positions from the model's own `get_rope_index` for the prompt). The copy exists because TRL's
  fused LM head scores one label per position: the last prompt position predicts chosen[0], the copy
  rejected[0]. So the vision tower and the prompt run once per pair instead of twice (four times with
  an on-the-fly reference).

The fast path changes only how the per-token log-probabilities are computed: `PackedPreferenceCollator`
emits, next to the packed model inputs (`packed_*` keys), a compact [chosen; rejected] view of the
answers (`input_ids`, `attention_mask`, `completion_mask`), and `install_packed_forward` makes the
model, given `packed_*` inputs, run the packed sequence and lay its per-token outputs out on that
view. TRL's own `_compute_loss` (every loss type, the on-the-fly or precomputed reference, the metrics)
and `compute_ref_log_probs` then run unchanged. tests/trainer/test_fast.py checks loss and LoRA
gradients against the plain path.
"""

from __future__ import annotations

import hashlib
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from trl import DPOTrainer
from trl.data_utils import apply_chat_template, is_conversational, prepare_multimodal_messages
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

PACKED = "packed_"  # batch keys only the packed forward reads
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# Families whose forward takes explicit position ids and a custom 4-D mask in the language model.
FAST_PATH_MODEL_TYPES = ("llava", "qwen2_5_vl")
# Per-token fields of TRL's FusedCausalLMOutput that are laid out on the [chosen; rejected] view.
_PER_TOKEN = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# Segment codes of a packed row.
_PAD, _PROMPT, _CHOSEN, _COPY, _REJECTED = -1, 0, 1, 2, 3


def fast_path_supported(model: Any) -> bool:
    """Whether `model` (a PeftModel or a bare model) can run the packed pair sequence."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in FAST_PATH_MODEL_TYPES


def _passthrough_refs(examples: list[dict[str, Any]], output: dict[str, Any]) -> dict[str, Any]:
    if REF_COLUMNS[0] in examples[0]:
        for name in REF_COLUMNS:
            output[name] = torch.tensor([float(ex[name]) for ex in examples], dtype=torch.float32)
    return output


@dataclass
class RefVisionCollator(DataCollatorForVisionPreference):
    """TRL's vision collator, keeping the precomputed `ref_*` columns it would drop."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        refs = [{k: ex[k] for k in REF_COLUMNS if k in ex} for ex in examples]
        return _passthrough_refs(refs, super().torch_call(examples))


@dataclass
class PackedPreferenceCollator(DataCollatorForVisionPreference):
    """One packed sequence per pair (module docstring), the images processed once per pair.

    Texts are rendered and tokenized exactly as TRL's vision collator does (chat template on the
    prompt, prompt and answers tokenized apart, no special tokens added, answers cut at `max_length`
    like TRL's keep-start truncation), so both paths score the same tokens.
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        refs = [{k: ex[k] for k in REF_COLUMNS if k in ex} for ex in examples]
        examples = [dict(ex) for ex in examples]
        if "image" in examples[0]:
            for example in examples:
                example["images"] = [example.pop("image")]
        images: list[Any] | None = [example["images"] for example in examples]
        if images is not None and all(img == [] for img in images):
            images = None
        if is_conversational(examples[0]):
            for example in examples:
                example["prompt"] = prepare_multimodal_messages(example["prompt"], images=example["images"])
                example["chosen"] = prepare_multimodal_messages(example["chosen"])
                example["rejected"] = prepare_multimodal_messages(example["rejected"])
            examples = [apply_chat_template(example, self.processor) for example in examples]
        texts = {"add_special_tokens": False, "return_tensors": self.return_tensors}
        prompts = self.processor(images=images, text=[ex["prompt"] for ex in examples], padding=True,
                                 padding_side="left", **texts)
        chosens = self.processor(text=[ex["chosen"] for ex in examples], padding=True, padding_side="right", **texts)
        rejecteds = self.processor(text=[ex["rejected"] for ex in examples], padding=True, padding_side="right",
                                   **texts)
        pad_id = self.processor.tokenizer.pad_token_id or self.processor.tokenizer.eos_token_id

        rows = []
        for b in range(len(examples)):
            keep = prompts["attention_mask"][b].bool()
            prompt = prompts["input_ids"][b][keep]
            mm = prompts["mm_token_type_ids"][b][keep] if "mm_token_type_ids" in prompts else None
            chosen = chosens["input_ids"][b][chosens["attention_mask"][b].bool()]
            rejected = rejecteds["input_ids"][b][rejecteds["attention_mask"][b].bool()]
            if self.max_length is not None:  # TRL cuts prompt + answer at max_length, keeping the start
                room = max(0, self.max_length - len(prompt))
                chosen, rejected = chosen[:room], rejected[:room]
            rows.append((prompt, mm, chosen, rejected))
        out = pack_pairs(rows, pad_id)
        for key, value in prompts.items():  # the images' tensors (pixel_values, image_grid_thw, ...)
            if key not in ("input_ids", "attention_mask", "mm_token_type_ids"):
                out[PACKED + key] = value
        return _passthrough_refs(refs, out)


def pack_pairs(rows: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]],
               pad_id: int) -> dict[str, torch.Tensor]:
    """The packed batch of (prompt ids, prompt mm_token_type_ids or None, chosen ids, rejected ids) rows.

    Packed row: prompt (P), chosen (C), a copy of the last prompt token, rejected (R), right padded.
    Returns the `packed_*` model inputs (ids, 4-D bool mask, position offsets, prompt mask, shift
    labels, mm_token_type_ids), the [chosen; rejected] view TRL's loss reads (row b and B + b: the
    last prompt token then the answer, right padded), `packed_gather` mapping each view position to the
    packed position predicting the same token, and `packed_plain_tokens` (tokens the plain path feeds).
    """
    batch = len(rows)
    length = max(len(p) + len(c) + 1 + len(r) for p, _, c, r in rows)
    view_len = 1 + max(max(len(c), len(r)) for _, _, c, r in rows)
    ids = torch.full((batch, length), pad_id, dtype=torch.long)
    seg = torch.full((batch, length), _PAD, dtype=torch.long)
    offsets = torch.zeros((batch, length), dtype=torch.long)
    shift_labels = torch.full((batch, length), -100, dtype=torch.long)
    mm_types = torch.zeros((batch, length), dtype=torch.long)
    view_ids = torch.full((2 * batch, view_len), pad_id, dtype=torch.long)
    view_mask = torch.zeros((2 * batch, view_len), dtype=torch.long)
    gather = torch.zeros((2 * batch, view_len - 1), dtype=torch.long)
    prompt_last = torch.zeros(batch, dtype=torch.long)
    plain_tokens = 0
    for b, (prompt, mm, chosen, rejected) in enumerate(rows):
        p, c, r = len(prompt), len(chosen), len(rejected)
        copy = p + c
        ids[b, :p], ids[b, p:copy], ids[b, copy], ids[b, copy + 1 : copy + 1 + r] = prompt, chosen, prompt[-1], rejected
        seg[b, :p], seg[b, p:copy], seg[b, copy], seg[b, copy + 1 : copy + 1 + r] = _PROMPT, _CHOSEN, _COPY, _REJECTED
        # Position = last prompt position + offset: answers restart after the prompt, the copy stands on it.
        offsets[b, p:copy] = torch.arange(1, c + 1)
        offsets[b, copy + 1 : copy + 1 + r] = torch.arange(1, r + 1)
        if mm is not None:
            mm_types[b, :p] = mm
        # Next-token labels where each is predicted: the last prompt token predicts chosen[0], the copy
        # rejected[0]; an answer's last token predicts nothing (TRL scores no token after the answer).
        shift_labels[b, p - 1 : copy - 1] = chosen
        shift_labels[b, copy : copy + r] = rejected
        view_ids[b, 0], view_ids[b, 1 : 1 + c] = prompt[-1], chosen
        view_ids[batch + b, 0], view_ids[batch + b, 1 : 1 + r] = prompt[-1], rejected
        view_mask[b, 1 : 1 + c] = 1
        view_mask[batch + b, 1 : 1 + r] = 1
        gather[b, :c] = torch.arange(p - 1, copy - 1)
        gather[batch + b, :r] = torch.arange(copy, copy + r)
        prompt_last[b] = p - 1
        plain_tokens += 2 * p + c + r
    return {
        PACKED + "input_ids": ids,
        PACKED + "attention_mask": packed_mask(seg, prompt_last),
        PACKED + "offsets": offsets,
        PACKED + "prompt_mask": (seg == _PROMPT).long(),
        PACKED + "prompt_last": prompt_last,
        PACKED + "shift_labels": shift_labels,
        PACKED + "mm_token_type_ids": mm_types,
        PACKED + "gather": gather,
        PACKED + "plain_tokens": torch.tensor(plain_tokens),
        "input_ids": view_ids,
        "attention_mask": view_mask.clone(),
        "completion_mask": view_mask,
    }


def packed_mask(seg: torch.Tensor, prompt_last: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool, True = query row may attend key column (see the module docstring)."""
    length = seg.shape[1]
    pos = torch.arange(length)
    causal = pos[None, :, None] >= pos[None, None, :]
    q, k = seg[:, :, None], seg[:, None, :]
    # The prompt without its last token: what the copy and the rejected answer see of it.
    prompt_head = (k == _PROMPT) & (pos[None, None, :] != prompt_last[:, None, None])
    allowed = (
        ((q == _PROMPT) & (k == _PROMPT))
        | ((q == _CHOSEN) & ((k == _PROMPT) | (k == _CHOSEN)))
        | (((q == _COPY) | (q == _REJECTED)) & (prompt_head | (k == _COPY) | (k == _REJECTED)))
    ) & causal
    # A padding row sees itself only: no all-masked row (sdpa would give NaN, and NaN values leak
    # through 0-weight products into the next layer's padding keys).
    allowed |= (q == _PAD) & (pos[None, :, None] == pos[None, None, :])
    return allowed[:, None]


def _positions(model: Any, packed: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Position ids of the packed rows: (B, L), or (3, B, L) for a model with 3-D rope (Qwen2.5-VL)."""
    ids, offsets, prompt_mask, last = (packed[k] for k in ("input_ids", "offsets", "prompt_mask", "prompt_last"))
    is_prompt = prompt_mask.bool()
    backbone = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(backbone, "model", backbone)
    if hasattr(inner, "get_rope_index"):
        # The model's own rope index of the prompt tokens (images get their 3-D grid positions).
        base, _ = inner.get_rope_index(
            ids, mm_token_type_ids=packed["mm_token_type_ids"], image_grid_thw=packed.get("image_grid_thw"),
            attention_mask=prompt_mask,
        )
        at_last = base.gather(2, last[None, :, None].expand(base.shape[0], -1, 1))  # (3, B, 1)
        return torch.where(is_prompt[None], base, at_last + offsets[None])
    base = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return torch.where(is_prompt, base, last[:, None] + offsets)


def install_packed_forward(model: Any) -> None:
    """Let `model` (the bare model TRL gave a fused LM head) run a packed batch.

    Called with `packed_*` inputs (and `fused_lm_head=True`), the forward runs the packed sequences and
    returns the fused head's per-token fields on the [chosen; rejected] view given as `labels` (its
    `input_ids` masked by `completion_mask`), exactly where TRL's plain path puts them. Without
    `packed_*` inputs it is the forward it was.
    """
    fused = model.forward

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        packed = {k[len(PACKED):]: kwargs.pop(k) for k in list(kwargs) if k.startswith(PACKED)}
        if not packed:
            return fused(*args, **kwargs)
        if not kwargs.get("fused_lm_head"):
            raise NotImplementedError("a packed DPO batch is only scored with fused_lm_head=True")
        labels = kwargs.pop("labels")
        for name in ("input_ids", "attention_mask", "shift_labels"):
            kwargs.pop(name, None)
        inputs = {k: v for k, v in packed.items()
                  if k not in ("offsets", "prompt_mask", "prompt_last", "shift_labels", "gather", "plain_tokens")}
        if not hasattr(getattr(self, "model", None), "get_rope_index"):
            inputs.pop("mm_token_type_ids")  # only the 3-D rope families take it
        out = fused(**inputs, position_ids=_positions(self, packed), shift_labels=packed["shift_labels"], **kwargs)
        gather = packed["gather"]
        pair = torch.arange(gather.shape[0], device=gather.device) % packed["input_ids"].shape[0]
        valid = labels[:, 1:] != -100
        for name in _PER_TOKEN:
            value = getattr(out, name, None)
            if value is not None:
                laid = value[pair[:, None], gather]
                out[name] = torch.where(valid, laid, torch.zeros((), dtype=laid.dtype, device=laid.device))
        out["label_mask"] = valid
        return out

    model.forward = types.MethodType(forward, model)


def reference_fingerprint(model: Any) -> str:
    """A cheap fingerprint of the reference weights (the base model: every parameter but LoRA's).

    Per tensor: name, shape, dtype, sum and sum of squares (computed where the tensor lives); what
    keys the cached reference log-probs, instead of TRL's sha256 of every byte (a 7B model: minutes).
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if "lora_" in name:
                continue
            t = tensor.detach()
            stats = torch.stack([t.double().sum(), t.double().square().sum()]).tolist() if t.numel() else []
            digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{stats}".encode())
    return digest.hexdigest()


class FastDPOTrainer(DPOTrainer):
    """`trl.DPOTrainer` with the two optional speed-ups of this module; both off = TRL's own step.

    Args (besides DPOTrainer's):
        fast_path: pack each pair into one sequence (ignored, plain path, when the model family is not
            in FAST_PATH_MODEL_TYPES).
        precompute_ref_logps: compute the reference log-probs once before training (needs a PEFT
            model: the reference is the adapter-disabled base) and train on them.
    """

    def __init__(self, *args: Any, fast_path: bool = True, precompute_ref_logps: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        from accelerate.utils import is_peft_model

        self.fast_path = bool(fast_path) and fast_path_supported(self.model)
        if precompute_ref_logps and not (is_peft_model(self.model) and self.ref_model is None):
            raise ValueError("precompute_ref_logps needs a LoRA training without a separate ref_model")
        collator = PackedPreferenceCollator if self.fast_path else RefVisionCollator
        if self.fast_path or precompute_ref_logps:
            if not isinstance(self.data_collator, DataCollatorForVisionPreference):
                raise ValueError("the DPO speed-ups are for vision pair sets (TRL's vision collator)")
            self.data_collator = collator(processor=self.processing_class, max_length=self.args.max_length)
        if self.fast_path:
            install_packed_forward(self.model.get_base_model())
        if precompute_ref_logps:
            # TRL's own routine, its config-time refusal for vision data bypassed (module docstring).
            self.args.precompute_ref_log_probs = True
            self.precompute_ref_logps = True
            self._precompute_model_hash = reference_fingerprint(self.model)
            batch_size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
            self.train_dataset = self._precompute_ref_logps(self.train_dataset, "train", batch_size)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.precompute_ref_logps and self._signature_columns is not None:
            self._signature_columns = [*self._signature_columns, *(c for c in REF_COLUMNS
                                                                   if c not in self._signature_columns)]

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> Any:
        with torch.inference_mode():
            return super().compute_ref_log_probs(model, inputs)

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        plain_tokens = inputs.pop(PACKED + "plain_tokens", None)
        mode = "train" if self.model.training else "eval"
        before = self._total_train_tokens
        result = super()._compute_loss(model, inputs, return_outputs)
        if plain_tokens is not None and mode == "train":
            # TRL counts the view's tokens; count what the plain path feeds, so the metric means the same.
            total = self.accelerator.gather_for_metrics(plain_tokens.reshape(1)).sum().item()
            self._total_train_tokens = before + total // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return result
