"""The `openai` generation backend: any OpenAI-compatible chat-completions server (DESIGN 2.3).

Normally that server is `vllm serve` (docker-compose runs one); on a CPU host `transformers serve` (the
`transformers[serving]` extra) serves the same local models, greedy and one candidate per prompt (it
ignores `n`, which fails clearly here). The protocol is the public one, spoken over httpx:
one POST to `{base_url}/chat/completions` per prompt, the prompt's text and images as interleaved
content parts (images as PNG data URLs), `n` candidates per request.

Token ids: the chat API returns text only. vLLM returns the sampled ids when asked with its
`return_token_ids` extension; we ask by default and fill `Candidate.token_ids` from the answer.
A server that ignores the field (or an OpenAI-style server that rejects it; we then stop asking)
returns text only: the ids then come from re-tokenising the text as the model wrote it (`AnswerReader`).

Image positions: the server's chat template decides where image tokens go. For `vllm serve` use a
template that renders image parts where they stand in the content list (LLaVA-1.5's stock template
puts every image first) and, with string-format templates, `--interleave-mm-strings`.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from PIL import Image

from core.errors import FatalError, TransientError, UserError
from workers.generate import AnswerReader, Candidate, GenerationConfig, PromptInput

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"


def interleave(prompt: PromptInput) -> list[str | Image.Image]:
    """The prompt as text pieces and images in order: each `<image>` replaced by its image.

    Empty text pieces are dropped, so joining the pieces back with `<image>` where the images stand
    gives the prompt text exactly.

    Raises:
        UserError: the number of `<image>` placeholders differs from the number of images.
    """
    texts = prompt.prompt.split(IMAGE_PLACEHOLDER)
    if len(texts) - 1 != len(prompt.images):
        raise UserError(
            f"prompt {prompt.uid!r} has {len(texts) - 1} {IMAGE_PLACEHOLDER} placeholders "
            f"but {len(prompt.images)} images",
            code="image_count_mismatch",
        )
    pieces: list[str | Image.Image] = []
    for i, text in enumerate(texts):
        if text:
            pieces.append(text)
        if i < len(prompt.images):
            pieces.append(prompt.images[i])
    return pieces


def content_parts(
    prompt: PromptInput, image_part: Callable[[Image.Image], dict[str, Any]]
) -> list[dict[str, Any]]:
    """Chat content parts for `prompt`: `{"type": "text"}` parts and `image_part(image)` in order."""
    return [
        {"type": "text", "text": piece} if isinstance(piece, str) else image_part(piece)
        for piece in interleave(prompt)
    ]


def png_data_url(image: Image.Image) -> str:
    """`data:image/png;base64,...` for `image` (PNG is lossless: the server sees our exact pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_url_part(image: Image.Image) -> dict[str, Any]:
    """An OpenAI `image_url` content part carrying `image` inline."""
    return {"type": "image_url", "image_url": {"url": png_data_url(image)}}


def _error_message(response: httpx.Response) -> str:
    """The server's own words from an error answer (OpenAI, vLLM or FastAPI shape), else its text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if body.get(key):
                return str(body[key])
    return str(body)[:500]


class _Refused(UserError):
    """A 4xx (not 429) from the server; `server_message` is its own words, for us and the log only."""

    def __init__(self, message: str, *, server_message: str) -> None:
        super().__init__(message, code="generation_server_refused")
        self.server_message = server_message


class OpenAIBackend:
    """Generation through an OpenAI-compatible `/chat/completions` endpoint.

    Args:
        base_url: the API root, as OpenAI clients take it (e.g. `http://vllm:8000/v1`).
        model: the served model name sent in every request.
        api_key: sent as a bearer token when given.
        timeout_s: per-request timeout (connect, read, write); a request that runs past it is retried.
        max_retries: retries after the first attempt for 5xx, 429, connection errors and timeouts.
        backoff_s: sleep before retry i is `backoff_s[min(i, len - 1)]`.
        concurrency: prompts of a batch in flight at once.
        return_token_ids: ask for the sampled token ids (vLLM's `return_token_ids` extension).
        endpoint: the name the operator gave the server (`MIADPO_GENERATION_ENDPOINTS`): errors name it, and
            never carry the server's URL or what it answered (that goes to the worker's log).
        reader: reads each answer (`AnswerReader` with the served model's tokenizer): stripped text, the
            answer's token ids (from `return_token_ids`, else from re-tokenising the text as written).
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        reader: AnswerReader,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: Sequence[float] = (0.5, 1.0, 2.0),
        concurrency: int = 8,
        return_token_ids: bool = True,
        endpoint: str | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        if not model:
            raise ValueError("model must be a non-empty served model name")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if not backoff_s or any(b < 0 for b in backoff_s):
            raise ValueError(f"backoff_s must be a non-empty list of delays >= 0, got {backoff_s!r}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = tuple(float(b) for b in backoff_s)
        self.concurrency = concurrency
        self.return_token_ids = return_token_ids
        self.reader = reader
        self._url = f"{self.base_url}/chat/completions"
        self._where = f"generation endpoint {endpoint!r}" if endpoint else "the generation server"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="openai-backend")
        self._lock = threading.Lock()

    def generate(self, batch: Sequence[PromptInput], config: GenerationConfig) -> list[list[Candidate]]:
        """`config.num_candidates` candidates per prompt, in batch order; prompts are sent concurrently.

        Raises:
            UserError: a prompt is malformed, or the server refused a request with a 4xx (not 429).
            TransientError: the server stayed unreachable, overloaded or failing after the retries.
            FatalError: the server answered 200 with something that is not a usable completion.
        """
        # Check every prompt before sending any, so a bad prompt costs no server time; the PNG
        # encoding then happens in the worker threads, in parallel.
        for prompt in batch:
            interleave(prompt)
        futures = [self._pool.submit(self._complete, prompt, config) for prompt in batch]
        try:
            return [future.result() for future in futures]
        finally:
            for future in futures:
                future.cancel()

    def close(self) -> None:
        """Stop the worker threads and close the HTTP connections."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    def _request_body(self, prompt: PromptInput, config: GenerationConfig) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": content_parts(prompt, image_url_part)}],
            "n": config.num_candidates,
            "temperature": config.temperature,
            "top_p": config.top_p,
            "max_tokens": config.max_new_tokens,
            "seed": config.seed,
            "stream": False,
        }

    def _complete(self, prompt: PromptInput, config: GenerationConfig) -> list[Candidate]:
        body = self._request_body(prompt, config)
        while True:
            asked_ids = self.return_token_ids
            request = {**body, "return_token_ids": True} if asked_ids else body
            try:
                answer = self._post(request)
                break
            except _Refused as exc:
                # An OpenAI-style server rejects unknown fields; ask once more without the extension.
                if not (asked_ids and "return_token_ids" in exc.server_message):
                    raise
                with self._lock:
                    if self.return_token_ids:
                        logger.warning(
                            "%s rejects return_token_ids; token ids come from re-tokenising", self._url
                        )
                        self.return_token_ids = False
        return self._candidates(prompt.uid, answer, config.num_candidates)

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries; the parsed JSON answer of the first 200."""
        attempts = self.max_retries + 1
        problems: list[str] = []
        for attempt in range(attempts):
            try:
                response = self._client.post(self._url, json=body)
            except httpx.TimeoutException as exc:
                problems.append(f"timeout after {self.timeout_s:g} s ({type(exc).__name__})")
            except httpx.TransportError as exc:
                logger.warning("POST %s: connection error: %s", self._url, exc)
                problems.append(f"connection error ({type(exc).__name__})")
            else:
                status = response.status_code
                if status == 200:
                    try:
                        return response.json()
                    except ValueError as exc:
                        logger.error("POST %s answered 200 with a body that is not JSON: %r", self._url, response.text[:200])
                        raise FatalError(
                            f"{self._where} answered with a body that is not JSON (see the worker log)",
                            code="generation_server_bad_response",
                        ) from exc
                message = _error_message(response)
                if status != 429 and status < 500:
                    logger.warning("POST %s was refused with HTTP %d: %s", self._url, status, message)
                    raise _Refused(
                        f"{self._where} refused the request with HTTP {status} (its answer is in the worker log; "
                        "check that it serves this model)",
                        server_message=message,
                    )
                problems.append(f"HTTP {status}")
                logger.warning("POST %s answered HTTP %d: %s", self._url, status, message)
            if attempt < self.max_retries:
                delay = self.backoff_s[min(attempt, len(self.backoff_s) - 1)]
                logger.info(
                    "POST %s failed (%s); retry %d/%d in %.2g s",
                    self._url,
                    problems[-1],
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                time.sleep(delay)
        what = "timed out" if all(p.startswith("timeout") for p in problems) else "failed"
        raise TransientError(
            f"{self._where} {what} on all {attempts} attempts (timeout {self.timeout_s:g} s per request); "
            f"last error: {problems[-1]}",
            code="generation_server_unavailable",
        )

    def _candidates(self, uid: str, answer: dict[str, Any], n: int) -> list[Candidate]:
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list):
            logger.error("%s answered without a choices list for prompt %r: %s", self._url, uid, str(answer)[:200])
            raise FatalError(
                f"{self._where} answered without a choices list for prompt {uid!r} (see the worker log)",
                code="generation_server_bad_response",
            )
        if len(choices) != n:
            raise FatalError(
                f"{self._where} returned {len(choices)} choices for prompt {uid!r}, expected n={n} "
                "(does the server support n > 1?)",
                code="generation_server_bad_response",
            )
        candidates = []
        for choice in sorted(choices, key=lambda c: c.get("index", 0)):
            message = choice.get("message") or {}
            text = message.get("content") or ""
            token_ids = [int(t) for t in choice.get("token_ids") or []]
            reason = choice.get("finish_reason") or "stop"
            if token_ids:
                candidates.append(self.reader.from_ids(token_ids, reason, text=text))
            else:
                candidates.append(self.reader.from_text(text, reason))
        return candidates
