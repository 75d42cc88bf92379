"""A small OpenAI-compatible chat-completions server around any in-process generation backend.

It stands in for `vllm serve` where there is no GPU (tests, a laptop) and can serve the `hf` backend
locally. It speaks the public protocol: `POST /v1/chat/completions` with text and `image_url` parts
(base64 data URLs only: the server fetches nothing), `GET /v1/models`, errors as `{"error": {...}}`.
It also honours vLLM's `return_token_ids` extension, so the `openai` backend gets token ids from it.

Single-turn only: one user message, whose parts become one `PromptInput` (text parts joined, with
`<image>` where the image parts stand). Requests are served one at a time: in-process backends are
not thread-safe, and batching across requests is what `vllm serve` is for.
"""

from __future__ import annotations

import base64
import binascii
import io
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from core.errors import MiadpoError, NotFoundError, UserError
from workers.backends.openai import IMAGE_PLACEHOLDER
from workers.generate import GenerationBackend, GenerationConfig, PromptInput


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart | ImagePart] | None = None


class ChatCompletionRequest(BaseModel):
    """The subset of the OpenAI request we serve; unknown fields are ignored, as vLLM does."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    n: int = Field(1, ge=1, le=128)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stream: bool = False
    return_token_ids: bool | None = None


def _decode_image(url: str) -> Image.Image:
    """A PIL image from a `data:image/...;base64,` URL."""
    header, sep, data = url.partition(",")
    if not (sep and header.startswith("data:image/") and header.endswith(";base64")):
        raise UserError("image_url must be a base64 data URL (data:image/...;base64,...)", param="messages")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
    except (binascii.Error, OSError, Image.DecompressionBombError) as exc:
        raise UserError(f"image_url is not a readable image: {exc}", param="messages") from exc
    return image


def _prompt_from_messages(messages: list[ChatMessage], uid: str) -> PromptInput:
    """The one user message as a PromptInput; anything multi-turn is refused."""
    if len(messages) != 1 or messages[0].role != "user":
        raise UserError("only a single user message is supported", param="messages")
    content = messages[0].content
    if content is None:
        raise UserError("the user message has no content", param="messages")
    if isinstance(content, str):
        content = [TextPart(type="text", text=content)]
    pieces: list[str] = []
    images: list[Image.Image] = []
    for part in content:
        if isinstance(part, TextPart):
            if IMAGE_PLACEHOLDER in part.text:
                raise UserError(
                    f"text parts may not contain {IMAGE_PLACEHOLDER}; send image parts", param="messages"
                )
            pieces.append(part.text)
        else:
            images.append(_decode_image(part.image_url.url))
            pieces.append(IMAGE_PLACEHOLDER)
    return PromptInput(uid=uid, prompt="".join(pieces), images=images)


def _error(
    status: int, message: str, type_: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": type_, "param": param, "code": code}},
    )


def create_chat_app(backend: GenerationBackend, model_name: str) -> FastAPI:
    """An OpenAI-compatible app serving `backend` under the model name `model_name`."""
    app = FastAPI(
        title="miadpo chat server", description=f"OpenAI-compatible chat completions for {model_name}"
    )
    created = int(time.time())
    lock = threading.Lock()

    @app.exception_handler(MiadpoError)
    async def miadpo_error(_: Request, exc: MiadpoError) -> JSONResponse:
        return _error(exc.status_code, exc.message, exc.type, exc.code, exc.param)

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"{type(exc).__name__}: {exc}", "server_error", "internal_error")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI answers a malformed request with 400, not FastAPI's 422.
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(
            400,
            f"{where}: {first.get('msg', 'invalid request')}",
            "invalid_request_error",
            param=where or None,
        )

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        """The one model this server answers for."""
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "miadpo"}],
        }

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatCompletionRequest) -> dict[str, Any]:
        """Answer one single-turn chat with `n` candidates."""
        if request.model != model_name:
            raise NotFoundError(
                f"The model `{request.model}` does not exist.", code="model_not_found", param="model"
            )
        if request.stream:
            raise UserError("streaming is not supported", param="stream")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        prompt = _prompt_from_messages(request.messages, request_id)
        try:
            config = GenerationConfig(
                max_new_tokens=request.max_completion_tokens
                or request.max_tokens
                or GenerationConfig.max_new_tokens,
                num_candidates=request.n,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=request.seed if request.seed is not None else 0,
                batch_size=1,
            )
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        with lock:
            candidates = backend.generate([prompt], config)[0]
        choices = []
        for index, candidate in enumerate(candidates):
            choice: dict[str, Any] = {
                "index": index,
                "message": {"role": "assistant", "content": candidate.text},
                "logprobs": None,
                "finish_reason": candidate.finish_reason,
            }
            if request.return_token_ids:  # as vLLM: every generated token, whitespace before the answer too
                choice["token_ids"] = [*candidate.lead_ids, *candidate.token_ids]
            choices.append(choice)
        completion_tokens = sum(len(c.token_ids) for c in candidates)
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            # The wrapped backend does not report prompt length; 0 rather than a guess.
            "usage": {
                "prompt_tokens": 0,
                "completion_tokens": completion_tokens,
                "total_tokens": completion_tokens,
            },
        }

    return app


@contextmanager
def serve(app) -> Iterator[str]:
    """Run `app` with uvicorn on a free loopback port in a thread; yields the OpenAI base URL.

    For tests and local experiments: `with serve(create_chat_app(HFBackend(h), "m")) as url: ...`
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("chat server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()
