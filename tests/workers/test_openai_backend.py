"""The openai backend against real HTTP servers on loopback: the chat server stand-in for `vllm serve`
(wrapping a backend that describes exactly what it received), and servers that fail, stall or refuse."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import sys
import time

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image
from starlette.responses import JSONResponse

from core.errors import FatalError, TransientError, UserError
from workers.backends.chat_server import create_chat_app, serve
from workers.backends.openai import OpenAIBackend
from workers.generate import Candidate, GenerationBackend, GenerationConfig, PromptInput

MODEL = "echo-model"


class EchoBackend:
    """Answers every prompt with a JSON description of what reached it: text, image sizes, pixels, config."""

    name = "echo"

    def __init__(self) -> None:
        self.seen: list[PromptInput] = []

    def generate(self, batch, config):
        results = []
        for prompt in batch:
            self.seen.append(prompt)
            description = {
                "prompt": prompt.prompt,
                "sizes": [list(im.size) for im in prompt.images],
                "modes": [im.mode for im in prompt.images],
                "pixels": [_digest(im) for im in prompt.images],
                "max_new_tokens": config.max_new_tokens,
                "temperature": config.temperature,
                "top_p": config.top_p,
                "seed": config.seed,
            }
            results.append(
                [
                    Candidate(
                        text=json.dumps({**description, "candidate": i}),
                        token_ids=[100 + i, len(prompt.images), len(prompt.prompt)],
                        finish_reason="length" if i % 2 else "stop",
                    )
                    for i in range(config.num_candidates)
                ]
            )
        return results

    def close(self) -> None:
        pass


def _digest(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def _noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": (3,), "L": ()}[mode]
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], *channels), dtype=np.uint8), mode)


class Wrapped:
    """ASGI middleware in front of an app: counts chat requests, can fail, stall or refuse some of them."""

    def __init__(
        self, app, *, fail_first: int = 0, status: int = 500, delay_s: float = 0.0, refuse_field=None
    ):
        self.app = app
        self.fail_first = fail_first
        self.status = status
        self.delay_s = delay_s
        self.refuse_field = refuse_field
        self.calls = 0
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].endswith("/chat/completions"):
            await self.app(scope, receive, send)
            return
        self.calls += 1
        call = self.calls
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        body = json.loads(raw)
        self.bodies.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if call <= self.fail_first:
                error = {"error": {"message": f"failure {call}", "type": "server_error", "code": None}}
                await JSONResponse(error, status_code=self.status)(scope, receive, send)
                return
            if self.refuse_field and self.refuse_field in body:
                message = f"Unrecognized request argument supplied: {self.refuse_field}"
                error = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
                await JSONResponse(error, status_code=400)(scope, receive, send)
                return
        finally:
            self.in_flight -= 1

        async def replay():
            return {"type": "http.request", "body": raw, "more_body": False}

        await self.app(scope, replay, send)


@pytest.fixture
def echo():
    return EchoBackend()


def _reader():
    from workers.generate import AnswerReader
    from workers.models.builtin import byte_level_tokenizer

    return AnswerReader(byte_level_tokenizer(["<pad>"], eos_token="<pad>", pad_token="<pad>"))


def _backend(url: str, model: str = MODEL, **kwargs) -> OpenAIBackend:
    kwargs.setdefault("backoff_s", (0.01,))
    kwargs.setdefault("reader", _reader())
    return OpenAIBackend(url, model, **kwargs)


def test_images_and_text_round_trip_exactly(echo):
    red, small, gray = _noise((37, 23), seed=1), _noise((5, 64), seed=2), _noise((48, 48), "L", seed=3)
    batch = [
        PromptInput(
            "seq",
            "Image1:<image>\nImage2:<image>\nImage3:<image>\nIn Image2, what is shown?",
            [red, small, gray],
        ),
        PromptInput("grid", "<image>\nIn Image1, describe it.", [small]),
        PromptInput("edges", "<image><image>", [gray, red]),
        PromptInput("text", "No image at all: <b>markup</b> stays.", []),
    ]
    config = GenerationConfig(max_new_tokens=17, num_candidates=3, temperature=0.7, top_p=0.9, seed=5)
    with serve(create_chat_app(echo, MODEL)) as url:
        backend = _backend(url)
        assert isinstance(backend, GenerationBackend)
        try:
            results = backend.generate(batch, config)
        finally:
            backend.close()

    assert isinstance(results, list) and len(results) == len(batch)
    for prompt, candidates in zip(batch, results, strict=True):
        assert len(candidates) == 3 and all(isinstance(c, Candidate) for c in candidates)
        for i, candidate in enumerate(candidates):
            seen = json.loads(candidate.text)
            assert seen["candidate"] == i
            assert seen["prompt"] == prompt.prompt
            assert seen["sizes"] == [list(im.size) for im in prompt.images]
            assert seen["modes"] == [im.mode for im in prompt.images]
            assert seen["pixels"] == [_digest(im) for im in prompt.images]
            assert (seen["max_new_tokens"], seen["temperature"], seen["top_p"], seen["seed"]) == (
                17,
                0.7,
                0.9,
                5,
            )
            # Token ids come back through vLLM's return_token_ids extension.
            assert candidate.token_ids == [100 + i, len(prompt.images), len(prompt.prompt)]
            assert candidate.finish_reason == ("length" if i % 2 else "stop")
            assert candidate.probe is None
    assert sorted(p.prompt for p in echo.seen) == sorted(p.prompt for p in batch)


def test_request_is_the_openai_schema(echo):
    image = _noise((8, 6), seed=4)
    spy = Wrapped(create_chat_app(echo, MODEL))
    with serve(spy) as url:
        backend = _backend(url, api_key="sk-test")
        try:
            [[candidate]] = backend.generate(
                [PromptInput("a", "Look: <image> and tell.", [image])], GenerationConfig()
            )
        finally:
            backend.close()
        models = httpx.get(f"{url}/models").json()

    [body] = spy.bodies
    assert body["model"] == MODEL and body["n"] == 1 and body["max_tokens"] == 512
    assert (body["temperature"], body["top_p"], body["seed"]) == (0.0, 1.0, 0)
    assert "logprobs" not in body and body["return_token_ids"] is True
    [message] = body["messages"]
    assert message["role"] == "user"
    text1, img, text2 = message["content"]
    assert text1 == {"type": "text", "text": "Look: "} and text2 == {"type": "text", "text": " and tell."}
    assert img["type"] == "image_url" and img["image_url"]["url"].startswith("data:image/png;base64,")
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]


def test_response_is_the_openai_schema(echo):
    with serve(create_chat_app(echo, MODEL)) as url:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2, "temperature": 0.5}
        answer = httpx.post(f"{url}/chat/completions", json=body).json()
        bad = httpx.post(f"{url}/chat/completions", json={**body, "n": 0})
        remote = httpx.post(
            f"{url}/chat/completions",
            json={
                **body,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                    }
                ],
            },
        )
    assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")
    assert answer["model"] == MODEL and isinstance(answer["created"], int)
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert json.loads(answer["choices"][0]["message"]["content"])["prompt"] == "hi"
    assert "token_ids" not in answer["choices"][0]  # only when asked for
    assert set(answer["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert remote.status_code == 400 and "data URL" in remote.json()["error"]["message"]


def test_prompts_of_a_batch_are_sent_concurrently(echo):
    spy = Wrapped(create_chat_app(echo, MODEL), delay_s=0.1)
    batch = [PromptInput(str(i), f"prompt {i}", []) for i in range(8)]
    with serve(spy) as url:
        backend = _backend(url, concurrency=4)
        try:
            results = backend.generate(batch, GenerationConfig())
        finally:
            backend.close()
    assert [json.loads(c.text)["prompt"] for [c] in results] == [p.prompt for p in batch]
    assert 1 < spy.max_in_flight <= 4


def test_server_errors_are_retried_then_succeed(echo):
    spy = Wrapped(create_chat_app(echo, MODEL), fail_first=2, status=500)
    with serve(spy) as url:
        backend = _backend(url, max_retries=3)
        try:
            [[candidate]] = backend.generate([PromptInput("a", "hello", [])], GenerationConfig())
        finally:
            backend.close()
    assert json.loads(candidate.text)["prompt"] == "hello"
    assert spy.calls == 3


def test_rate_limit_then_exhausted_retries_is_transient(echo):
    spy = Wrapped(create_chat_app(echo, MODEL), fail_first=10, status=429)
    with serve(spy) as url:
        backend = _backend(url, max_retries=2)
        try:
            with pytest.raises(TransientError) as err:
                backend.generate([PromptInput("a", "hello", [])], GenerationConfig())
        finally:
            backend.close()
    assert spy.calls == 3
    message = err.value.message
    assert url in message and "HTTP 429" in message and "failure 3" in message and "3 attempts" in message


def test_timeout_is_transient_and_bounded(echo):
    spy = Wrapped(create_chat_app(echo, MODEL), delay_s=1.0)
    with serve(spy) as url:
        backend = _backend(url, timeout_s=0.3, max_retries=1, backoff_s=(0.05,))
        start = time.monotonic()
        try:
            with pytest.raises(TransientError) as err:
                backend.generate([PromptInput("a", "hello", [])], GenerationConfig())
        finally:
            elapsed = time.monotonic() - start
            backend.close()
    assert (
        "timed out" in err.value.message and "timeout" in err.value.message and "0.3 s" in err.value.message
    )
    assert spy.calls == 2
    assert 0.6 <= elapsed < 0.3 * 2 + 0.05 + 0.5


def test_unreachable_server_is_transient():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        backend = _backend(f"http://127.0.0.1:{port}/v1", max_retries=1)
        try:
            with pytest.raises(TransientError) as err:
                backend.generate([PromptInput("a", "hello", [])], GenerationConfig())
        finally:
            backend.close()
    assert "connection error" in err.value.message and f"127.0.0.1:{port}" in err.value.message


def test_bad_request_is_a_user_error_and_not_retried(echo):
    spy = Wrapped(create_chat_app(echo, MODEL))
    with serve(spy) as url:
        backend = _backend(url, max_retries=3)
        try:
            # The server allows temperature <= 2, as OpenAI does.
            with pytest.raises(UserError) as err:
                backend.generate([PromptInput("a", "hello", [])], GenerationConfig(temperature=3.0))
            assert spy.calls == 1
            assert "HTTP 400" in err.value.message and "temperature" in err.value.message
            wrong_model = _backend(url, model="no-such-model")
            try:
                with pytest.raises(UserError) as err:
                    wrong_model.generate([PromptInput("a", "hello", [])], GenerationConfig())
            finally:
                wrong_model.close()
            assert spy.calls == 2
            assert "HTTP 404" in err.value.message and "no-such-model" in err.value.message
        finally:
            backend.close()


def test_placeholder_image_mismatch_is_refused_before_sending(echo):
    spy = Wrapped(create_chat_app(echo, MODEL))
    with serve(spy) as url:
        backend = _backend(url)
        try:
            with pytest.raises(UserError, match="2 <image> placeholders but 1 images"):
                backend.generate(
                    [PromptInput("ok", "fine", []), PromptInput("bad", "<image><image>", [_noise((4, 4))])],
                    GenerationConfig(),
                )
        finally:
            backend.close()
    assert spy.calls == 0


def test_server_without_token_ids_extension(echo):
    spy = Wrapped(create_chat_app(echo, MODEL), refuse_field="return_token_ids")
    with serve(spy) as url:
        backend = _backend(url)
        try:
            first = backend.generate([PromptInput("a", "one", [])], GenerationConfig())
            second = backend.generate([PromptInput("b", "two", [])], GenerationConfig())
        finally:
            backend.close()
    # Refused once, then never asked again; the ids come from re-tokenising the (stripped) text instead.
    assert ["return_token_ids" in body for body in spy.bodies] == [True, False, False]
    tokenizer = backend.reader.tokenizer
    for (candidate,) in (first[0], second[0]):
        assert candidate.token_ids == tokenizer(candidate.text, add_special_tokens=False)["input_ids"]
    assert json.loads(second[0][0].text)["prompt"] == "two"


def test_fewer_choices_than_asked_is_fatal():
    app = FastAPI()

    @app.post("/v1/chat/completions")
    def one_choice() -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}
        return {"id": "c", "object": "chat.completion", "created": 0, "model": MODEL, "choices": [choice]}

    with serve(app) as url:
        backend = _backend(url)
        try:
            with pytest.raises(FatalError, match="returned 1 choices .* expected n=2"):
                backend.generate(
                    [PromptInput("a", "x", [])], GenerationConfig(num_candidates=2, temperature=1.0)
                )
        finally:
            backend.close()


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="timeout_s"):
        OpenAIBackend("http://127.0.0.1:1/v1", MODEL, timeout_s=0, reader=_reader())
    with pytest.raises(ValueError, match="concurrency"):
        OpenAIBackend("http://127.0.0.1:1/v1", MODEL, concurrency=0, reader=_reader())
    with pytest.raises(ValueError, match="base_url"):
        OpenAIBackend("127.0.0.1:1/v1", MODEL, reader=_reader())


def test_vllm_backend_without_vllm_says_how_to_install(monkeypatch):
    import workers.backends.vllm as vllm_backend

    assert "vllm" not in sys.modules  # importing the backend module does not import vLLM
    monkeypatch.setitem(sys.modules, "vllm", None)  # absent, even where it happens to be installed
    with pytest.raises(UserError) as err:
        vllm_backend.VLLMBackend("/models/llava")
    assert "pip install miadpo[vllm]" in err.value.message
    assert err.value.code == "vllm_not_installed"


def test_hf_backend_served_over_http_answers_as_in_process(tmp_path):
    # Imported here: torch and the model code are the slow part of this module's imports.
    from core.settings import Settings
    from workers.backends.hf import HFBackend
    from workers.models import load_model

    hf = HFBackend(load_model("tiny-llava", Settings(data_dir=tmp_path)), record_attention=False)
    batch = [
        PromptInput(
            "seq",
            "Image1:<image>\nImage2:<image>\nIn Image2, what color is it?",
            [_noise((40, 30), seed=5), _noise((20, 50), seed=6)],
        ),
        PromptInput("grid", "<image>\nIn Image1, describe the shape.", [_noise((64, 64), seed=7)]),
        PromptInput("pip", "<image>\nFor the image in the center, what is it?", [_noise((33, 47), seed=8)]),
    ]
    greedy = GenerationConfig(max_new_tokens=12)
    sampled = GenerationConfig(max_new_tokens=12, num_candidates=2, temperature=0.8, top_p=0.9, seed=3)
    # The server gets one prompt (and the request's seed) per call: compare with the same in process.
    direct = {config: [hf.generate([prompt], config)[0] for prompt in batch] for config in (greedy, sampled)}
    with serve(create_chat_app(hf, "tiny-llava")) as url:
        backend = OpenAIBackend(url, "tiny-llava", backoff_s=(0.01,), reader=hf.handle.answer_reader())
        try:
            remote = {config: backend.generate(batch, config) for config in (greedy, sampled)}
        finally:
            backend.close()
    for config in (greedy, sampled):
        expected = [[(c.text, c.token_ids, c.finish_reason) for c in cands] for cands in direct[config]]
        got = [[(c.text, c.token_ids, c.finish_reason) for c in cands] for cands in remote[config]]
        assert got == expected
        assert [len(cands) for cands in got] == [config.num_candidates] * len(batch)
    assert len({c.text for cands in remote[sampled] for c in cands}) > 1  # sampling did sample
