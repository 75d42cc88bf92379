"""The `vllm` generation backend: vLLM's offline engine inside the GPU worker (DESIGN 2.3).

vLLM is an optional extra (`pip install miadpo[vllm]`) and is imported only when this backend is
built, never when this module is imported.

Two ways to turn a `PromptInput` into engine input:
- default: `LLM.chat` with the prompt as interleaved text and `image_pil` parts; vLLM applies the
  model's chat template (the same path `vllm serve` takes for the `openai` backend, so both give the
  same prompts). `interleave_mm_strings` is switched on where vLLM knows it, so string-format chat
  templates keep each image where its `<image>` stood; pass `chat_template` for a model whose stock
  template moves images (LLaVA-1.5's puts them all first).
- `prompt_renderer`: a function giving the full prompt text with the model's own image tokens, which
  is sent with `LLM.generate` and `multi_modal_data`. Use it to render exactly as the `hf` backend
  does for the same family.

Sampled token ids come back from the engine, so `Candidate.token_ids` is always filled; attention
is not, so the probe pass computes it afterwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from core.errors import FatalError, UserError
from workers.backends.openai import content_parts
from workers.generate import AnswerReader, Candidate, GenerationConfig, PromptInput

INSTALL_HINT = "pip install miadpo[vllm]"


class VLLMBackend:
    """Generation with `vllm.LLM`, one engine per backend (load once, keep while jobs come).

    Args:
        model_path: a local model directory or hub id vLLM can load.
        limit_mm_per_prompt: most images in one prompt (the paper goes up to 9: 3x3 grids, 5 in sequence).
        max_model_len: context length; None lets vLLM take the model's.
        gpu_memory_utilization: share of GPU memory vLLM may claim (weights + KV cache).
        dtype: weight and activation dtype ("auto", "bfloat16", "float16").
        chat_template: overrides the model's chat template on the `LLM.chat` path.
        prompt_renderer: when given, prompts are rendered by it and sent with `LLM.generate`.
        **engine_kwargs: passed to `vllm.LLM` as they are (tensor_parallel_size, enforce_eager, ...).
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        limit_mm_per_prompt: int = 9,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "auto",
        chat_template: str | None = None,
        prompt_renderer: Callable[[PromptInput], str] | None = None,
        **engine_kwargs: Any,
    ) -> None:
        if limit_mm_per_prompt < 1:
            raise ValueError(f"limit_mm_per_prompt must be >= 1, got {limit_mm_per_prompt}")
        if max_model_len is not None and max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        try:
            import vllm
        except ImportError as exc:
            raise UserError(
                f"the vllm backend needs vLLM, which is not installed: {INSTALL_HINT} "
                "(on a machine with a CUDA GPU), or choose the hf or openai backend",
                code="vllm_not_installed",
            ) from exc

        kwargs: dict[str, Any] = {
            "model": model_path,
            "limit_mm_per_prompt": {"image": limit_mm_per_prompt},
            "gpu_memory_utilization": gpu_memory_utilization,
            "dtype": dtype,
        }
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        engine_fields = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
        if "interleave_mm_strings" in engine_fields:
            kwargs["interleave_mm_strings"] = True
        kwargs.update(engine_kwargs)

        self.model_path = model_path
        self.limit_mm_per_prompt = limit_mm_per_prompt
        self._chat_template = chat_template
        self._prompt_renderer = prompt_renderer
        self._sampling_params = vllm.SamplingParams
        self._llm: Any = vllm.LLM(**kwargs)
        # Answers stripped, token ids trimmed to the answer proper, as every backend does.
        self._reader = AnswerReader(self._llm.get_tokenizer())

    def generate(self, batch: Sequence[PromptInput], config: GenerationConfig) -> list[list[Candidate]]:
        """`config.num_candidates` candidates per prompt, in batch order; the engine schedules the batch.

        Raises:
            UserError: a prompt has more images than `limit_mm_per_prompt`, or placeholders and
                images do not match.
        """
        if not batch:
            return []
        for prompt in batch:
            if len(prompt.images) > self.limit_mm_per_prompt:
                raise UserError(
                    f"prompt {prompt.uid!r} has {len(prompt.images)} images; this engine allows "
                    f"{self.limit_mm_per_prompt} (limit_mm_per_prompt)",
                    code="too_many_images",
                )
        params = self._sampling_params(
            n=config.num_candidates,
            temperature=config.temperature,
            top_p=config.top_p,
            max_tokens=config.max_new_tokens,
            seed=config.seed,
        )
        if self._prompt_renderer is not None:
            prompts: list[dict[str, Any]] = []
            for prompt in batch:
                item: dict[str, Any] = {"prompt": self._prompt_renderer(prompt)}
                if prompt.images:
                    item["multi_modal_data"] = {"image": list(prompt.images)}
                prompts.append(item)
            outputs = self._llm.generate(prompts, params, use_tqdm=False)
        else:
            conversations = [
                [{"role": "user", "content": content_parts(prompt, _image_pil_part)}] for prompt in batch
            ]
            outputs = self._llm.chat(conversations, params, use_tqdm=False, chat_template=self._chat_template)

        if len(outputs) != len(batch):
            raise FatalError(f"vLLM returned {len(outputs)} results for {len(batch)} prompts")
        results = []
        for prompt, output in zip(batch, outputs, strict=True):
            completions = sorted(output.outputs, key=lambda o: o.index)
            if len(completions) != config.num_candidates:
                raise FatalError(
                    f"vLLM returned {len(completions)} candidates for prompt {prompt.uid!r}, "
                    f"expected {config.num_candidates}"
                )
            results.append([self._reader.from_ids(list(c.token_ids), c.finish_reason or "stop") for c in completions])
        return results

    def close(self) -> None:
        """Drop the engine so its GPU memory can be freed."""
        self._llm = None


def _image_pil_part(image: Any) -> dict[str, Any]:
    # vLLM's own content-part type for an in-memory PIL image: no encode/decode round trip.
    return {"type": "image_pil", "image_pil": image}
