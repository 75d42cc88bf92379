"""The `hf` generation backend: transformers `generate`, batched, in process (DESIGN 2.3).

Prompts are left padded into one batch; greedy, or `num_candidates` sampled answers per prompt
(`num_return_sequences`, seeded). With `record_attention` (the default) every candidate comes
back with its `ProbeResult`: the attention rows and token log-probabilities are recorded during
generation itself (`workers.attention.GenerationRecording`), so the attention stage needs no
second forward pass for this backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from workers.attention import GenerationRecording
from workers.generate import Candidate, GenerationConfig, PromptInput, split_answer
from workers.models.base import ModelHandle


class HFBackend:
    """Generation with an in-process transformers model."""

    name = "hf"

    def __init__(
        self, handle: ModelHandle, record_attention: bool = True, layers: Sequence[int] | None = None
    ):
        """
        Args:
            handle: the loaded model (workers.models.load_model).
            record_attention: attach a ProbeResult to each candidate, recorded during generation.
            layers: language-model layers the attention averages over (default: the middle one).
        """
        self.handle = handle
        self.record_attention = record_attention
        self.layers = handle.resolve_layers(layers)

    def generate(self, batch: Sequence[PromptInput], config: GenerationConfig) -> list[list[Candidate]]:
        """`config.num_candidates` candidates per prompt, prompts in order, `config.batch_size` per call."""
        out: list[list[Candidate]] = []
        for index, start in enumerate(range(0, len(batch), config.batch_size)):
            out.extend(self._generate(batch[start : start + config.batch_size], config, config.seed + index))
        return out

    def close(self) -> None:
        """Nothing to release: the model belongs to whoever loaded the handle."""

    def _generate(
        self, prompts: Sequence[PromptInput], config: GenerationConfig, seed: int
    ) -> list[list[Candidate]]:
        handle = self.handle
        model, tokenizer = handle.model, handle.processor.tokenizer
        enc = handle.family.encode(handle.processor, prompts)
        device = handle.device
        inputs = {
            k: v.to(device=device, dtype=model.dtype) if v.is_floating_point() else v.to(device)
            for k, v in enc.inputs.items()
        }
        n = config.num_candidates
        eos_ids = _eos_ids(model, tokenizer)
        pad_id = model.generation_config.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        kwargs: dict[str, Any] = {
            "max_new_tokens": config.max_new_tokens,
            "num_return_sequences": n,
            "num_beams": 1,
            "do_sample": config.do_sample,
            "repetition_penalty": 1.0,  # the checkpoint's own sampling defaults must not leak in
            # An answer holding an image placeholder could not be fed back to the model (attention
            # pass, training); the recorded log-probabilities stay those of the raw logits.
            "suppress_tokens": handle.family.placeholder_token_ids(handle.processor),
            "eos_token_id": eos_ids,
            "pad_token_id": pad_id,
            "return_dict_in_generate": True,
        }
        if config.do_sample:
            kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=0)

        recording = GenerationRecording(handle, enc, self.layers, repeat=n) if self.record_attention else None
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            if recording is not None:
                with recording:
                    output = model.generate(**inputs, **kwargs)
            else:
                output = model.generate(**inputs, **kwargs)

        new_tokens = output.sequences[:, enc.seq_len :].cpu()
        eos = torch.tensor(eos_ids)
        spans, texts, reasons = [], [], []
        for row in new_tokens:
            stops = torch.nonzero(torch.isin(row, eos)).flatten()
            length = int(stops[0]) if len(stops) else int(row.shape[0])
            start, stop, text = split_answer(tokenizer, row[:length].tolist())
            spans.append((start, stop))
            texts.append(text)
            reasons.append("stop" if len(stops) else "length")
        probes = recording.results(new_tokens, spans) if recording is not None else [None] * len(spans)

        candidates: list[list[Candidate]] = []
        for i, ((start, stop), text, reason, probe) in enumerate(zip(spans, texts, reasons, probes, strict=True)):
            row = new_tokens[i].tolist()
            if i % n == 0:
                candidates.append([])
            candidates[-1].append(
                Candidate(text=text, token_ids=row[start:stop], finish_reason=reason, probe=probe, lead_ids=row[:start])
            )
        return candidates


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the model has no EOS token: set generation_config.eos_token_id")
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
