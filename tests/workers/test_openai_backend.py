"""The openai backend against a real OpenAI-compatible server: `transformers serve` on the tiny LLaVA (a
process of its own, CPU, offline), alone or behind a proxy that records what reaches it and injects
faults (500s, 429s, stalls, a refused extension), and against no server at all."""

from __future__ import annotations

import base64
import io
import socket
import sys
import time
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from PIL import Image

from core.errors import FatalError, TransientError, UserError
from tests.workers.servers import FaultProxy, serve
from workers.backends.openai import OpenAIBackend
from workers.generate import AnswerReader, Candidate, GenerationBackend, GenerationConfig, PromptInput

SHORT = GenerationConfig(max_new_tokens=4)


def _noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": (3,), "L": ()}[mode]
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], *channels), dtype=np.uint8), mode)


def _image_of(part: dict) -> Image.Image:
    header, data = part["image_url"]["url"].split(",", 1)
    assert header == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


@dataclass
class Served:
    """The session's `transformers serve`: its base URL, the served model name, and backends that read the
    answers with the served model's tokenizer."""

    url: str
    model: str
    reader: AnswerReader

    def backend(self, url: str, model: str | None = None, **kwargs) -> OpenAIBackend:
        kwargs.setdefault("backoff_s", (0.01,))
        return OpenAIBackend(url, model or self.model, reader=self.reader, **kwargs)


@pytest.fixture
def server(served_tiny_llava, tiny_llava) -> Served:
    return Served(*served_tiny_llava, tiny_llava.answer_reader())


def _ids(server: Served, text: str) -> list[int]:
    return server.reader.tokenizer(text, add_special_tokens=False)["input_ids"]


def _reader() -> AnswerReader:
    """A reader for a backend that reaches no server."""
    from workers.models.builtin import byte_level_tokenizer

    return AnswerReader(byte_level_tokenizer(["<pad>"], eos_token="<pad>", pad_token="<pad>"))


def test_prompts_reach_the_server_exactly_and_its_answers_come_back(server):
    url = server.url
    red, small, gray = _noise((37, 23), seed=1), _noise((5, 64), seed=2), _noise((48, 48), "L", seed=3)
    batch = [
        PromptInput("seq", "Image1:<image>\nImage2:<image>\nImage3:<image>\nIn Image2, what is shown?", [red, small, gray]),
        PromptInput("grid", "<image>\nIn Image1, describe it.", [small]),
        PromptInput("edges", "<image><image>", [gray, red]),
        PromptInput("text", "No image at all: <b>markup</b> stays.", []),
    ]
    spy = FaultProxy(url)
    with serve(spy) as proxy:
        backend = server.backend(proxy, return_token_ids=False)
        assert isinstance(backend, GenerationBackend)
        try:
            results = backend.generate(batch, SHORT)
        finally:
            backend.close()

    # What the server got: each prompt's text pieces and images in order, the images pixel for pixel.
    sent = {}
    for body in spy.bodies:
        [message] = body["messages"]
        sent["".join(p["text"] if p["type"] == "text" else "<image>" for p in message["content"])] = message["content"]
    assert len(spy.bodies) == len(batch) and set(sent) == {p.prompt for p in batch}
    for prompt in batch:
        images = [_image_of(part) for part in sent[prompt.prompt] if part["type"] == "image_url"]
        assert [(im.size, im.mode, im.tobytes()) for im in images] == [(im.size, im.mode, im.tobytes()) for im in prompt.images]

    assert len(results) == len(batch)
    for candidates in results:
        [candidate] = candidates
        assert isinstance(candidate, Candidate) and candidate.text
        # transformers serve returns no token ids (vLLM's extension): they come from re-tokenising the text.
        assert candidate.token_ids == _ids(server, candidate.text) and candidate.token_ids
        assert candidate.finish_reason == "length" and candidate.probe is None


def test_request_is_the_openai_schema(server):
    url, model = server.url, server.model
    spy = FaultProxy(url)
    with serve(spy) as proxy:
        backend = server.backend(proxy, api_key="sk-test", return_token_ids=False)
        try:
            [[candidate]] = backend.generate([PromptInput("a", "Look: <image> and tell.", [_noise((8, 6), seed=4)])], GenerationConfig(max_new_tokens=3))
        finally:
            backend.close()
        models = httpx.get(f"{proxy}/models").json()

    [body] = spy.bodies
    assert body["model"] == model and body["n"] == 1 and body["max_tokens"] == 3
    assert (body["temperature"], body["top_p"], body["seed"]) == (0.0, 1.0, 0)
    assert "logprobs" not in body and "return_token_ids" not in body
    [message] = body["messages"]
    assert message["role"] == "user"
    text1, img, text2 = message["content"]
    assert text1 == {"type": "text", "text": "Look: "} and text2 == {"type": "text", "text": " and tell."}
    assert img["type"] == "image_url" and img["image_url"]["url"].startswith("data:image/png;base64,")
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [model]
    assert candidate.text


def test_prompts_of_a_batch_are_sent_concurrently(server):
    url = server.url
    spy = FaultProxy(url, delay_s=0.2)
    batch = [PromptInput(str(i), f"prompt {i}", []) for i in range(6)]
    with serve(spy) as proxy:
        backend = server.backend(proxy, concurrency=3, return_token_ids=False)
        try:
            results = backend.generate(batch, SHORT)
        finally:
            backend.close()
    assert [len(r) for r in results] == [1] * 6 and spy.calls == 6
    assert sorted(b["messages"][0]["content"][0]["text"] for b in spy.bodies) == [p.prompt for p in batch]
    assert 1 < spy.max_in_flight <= 3


def test_server_errors_are_retried_then_succeed(server):
    url = server.url
    spy = FaultProxy(url, fail_first=2, status=500)
    with serve(spy) as proxy:
        backend = server.backend(proxy, max_retries=3, return_token_ids=False)
        try:
            [[candidate]] = backend.generate([PromptInput("a", "hello", [])], SHORT)
        finally:
            backend.close()
        direct = server.backend(url, return_token_ids=False)
        try:
            [[reference]] = direct.generate([PromptInput("a", "hello", [])], SHORT)
        finally:
            direct.close()
    assert spy.calls == 3
    assert candidate.text == reference.text  # the server's own answer came through the retries


def test_rate_limit_then_exhausted_retries_is_transient(server):
    url = server.url
    spy = FaultProxy(url, fail_first=10, status=429)
    with serve(spy) as proxy:
        backend = server.backend(proxy, max_retries=2)
        try:
            with pytest.raises(TransientError) as err:
                backend.generate([PromptInput("a", "hello", [])], SHORT)
        finally:
            backend.close()
    assert spy.calls == 3
    message = err.value.message
    # The server's words and URL stay in the log: a tenant's error names the endpoint only.
    assert "HTTP 429" in message and "3 attempts" in message
    assert proxy not in message and "failure 3" not in message


def test_timeout_is_transient_and_bounded(server):
    url = server.url
    spy = FaultProxy(url, delay_s=1.0)
    with serve(spy) as proxy:
        backend = server.backend(proxy, timeout_s=0.3, max_retries=1, backoff_s=(0.05,))
        start = time.monotonic()
        try:
            with pytest.raises(TransientError) as err:
                backend.generate([PromptInput("a", "hello", [])], SHORT)
        finally:
            elapsed = time.monotonic() - start
            backend.close()
    assert "timed out" in err.value.message and "timeout" in err.value.message and "0.3 s" in err.value.message
    assert spy.calls == 2
    assert 0.6 <= elapsed < 0.3 * 2 + 0.05 + 0.5


def test_unreachable_server_is_transient():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", reader=_reader(), max_retries=1, backoff_s=(0.01,))
        try:
            with pytest.raises(TransientError) as err:
                backend.generate([PromptInput("a", "hello", [])], SHORT)
        finally:
            backend.close()
    assert "connection error" in err.value.message and f"127.0.0.1:{port}" not in err.value.message


def test_a_refused_request_is_a_user_error_and_not_retried(server):
    url = server.url
    spy = FaultProxy(url)
    with serve(spy) as proxy:
        wrong_model = server.backend(proxy, "no-such-model", max_retries=3, return_token_ids=False, endpoint="local")
        try:
            with pytest.raises(UserError) as err:
                wrong_model.generate([PromptInput("a", "hello", [])], SHORT)
        finally:
            wrong_model.close()
    assert spy.calls == 1
    assert "HTTP 400" in err.value.message and "generation endpoint 'local'" in err.value.message
    assert "no-such-model" not in err.value.message and proxy not in err.value.message  # its words go to the log only


def test_placeholder_image_mismatch_is_refused_before_sending(server):
    url = server.url
    spy = FaultProxy(url)
    with serve(spy) as proxy:
        backend = server.backend(proxy)
        try:
            with pytest.raises(UserError, match="2 <image> placeholders but 1 images"):
                backend.generate(
                    [PromptInput("ok", "fine", []), PromptInput("bad", "<image><image>", [_noise((4, 4))])], SHORT
                )
        finally:
            backend.close()
    assert spy.calls == 0


@pytest.mark.parametrize("refused_by", ["transformers serve", "an OpenAI-style 400"])
def test_a_server_without_the_token_ids_extension_is_asked_once(server, refused_by):
    url = server.url
    spy = FaultProxy(url, refuse_field="return_token_ids" if refused_by != "transformers serve" else None)
    with serve(spy) as proxy:
        backend = server.backend(proxy)
        try:
            first = backend.generate([PromptInput("a", "one", [])], SHORT)
            second = backend.generate([PromptInput("b", "two", [])], SHORT)
        finally:
            backend.close()
    # Refused once (transformers serve: 422 "Unexpected fields"), then never asked again.
    assert ["return_token_ids" in body for body in spy.bodies] == [True, False, False]
    for [candidate] in (first[0], second[0]):  # the ids come from re-tokenising the text instead
        assert candidate.text and candidate.token_ids == _ids(server, candidate.text)


def test_a_server_that_ignores_n_is_a_clear_error(server):
    url = server.url
    backend = server.backend(url, return_token_ids=False)
    try:
        # transformers serve answers one choice whatever `n` says: several candidates need `vllm serve`.
        with pytest.raises(FatalError, match=r"returned 1 choices .* expected n=2 \(does the server support n > 1\?\)"):
            backend.generate([PromptInput("a", "x", [])], GenerationConfig(max_new_tokens=2, num_candidates=2, temperature=1.0))
    finally:
        backend.close()


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="timeout_s"):
        OpenAIBackend("http://127.0.0.1:1/v1", "m", timeout_s=0, reader=_reader())
    with pytest.raises(ValueError, match="concurrency"):
        OpenAIBackend("http://127.0.0.1:1/v1", "m", concurrency=0, reader=_reader())
    with pytest.raises(ValueError, match="base_url"):
        OpenAIBackend("127.0.0.1:1/v1", "m", reader=_reader())


def test_vllm_backend_without_vllm_says_how_to_install(monkeypatch):
    import workers.backends.vllm as vllm_backend

    assert "vllm" not in sys.modules  # importing the backend module does not import vLLM
    monkeypatch.setitem(sys.modules, "vllm", None)  # absent, even where it happens to be installed
    with pytest.raises(UserError) as err:
        vllm_backend.VLLMBackend("/models/llava")
    assert "pip install miadpo[vllm]" in err.value.message
    assert err.value.code == "vllm_not_installed"


def test_the_served_model_answers_as_the_in_process_hf_backend(server, tiny_llava):
    from workers.backends.hf import HFBackend

    url = server.url
    hf = HFBackend(tiny_llava, record_attention=False)
    batch = [
        PromptInput("seq", "Image1:<image>\nImage2:<image>\nIn Image2, what color is it?", [_noise((40, 30), seed=5), _noise((20, 50), seed=6)]),
        PromptInput("grid", "<image>\nIn Image1, describe the shape.", [_noise((64, 64), seed=7)]),
        PromptInput("pip", "<image>\nFor the image in the center, what is it?", [_noise((33, 47), seed=8)]),
    ]
    greedy = GenerationConfig(max_new_tokens=12)
    direct = hf.generate(batch, greedy)
    backend = server.backend(url)
    try:
        remote = backend.generate(batch, greedy)
    finally:
        backend.close()
    assert [[(c.text, c.finish_reason) for c in cands] for cands in remote] == [
        [(c.text, c.finish_reason) for c in cands] for cands in direct
    ]
    assert len({cands[0].text for cands in remote}) == len(batch)  # real, different answers


def test_the_pipeline_hands_the_endpoint_name_to_the_backend(tiny_llava):
    from workers.pipeline import PipelineConfig, make_backend

    config = PipelineConfig(backend="openai", base_url="http://127.0.0.1:9/v1", endpoint="local")
    backend = make_backend(config, tiny_llava)
    try:
        assert isinstance(backend, OpenAIBackend) and backend._where == "generation endpoint 'local'"
    finally:
        backend.close()
