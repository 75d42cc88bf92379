"""The hf generation backend (DESIGN 2.3), and the attention it records during generation (2.4, 5)."""

from __future__ import annotations

import numpy as np
import pytest

from workers.attention import ProbeResult, probe
from workers.backends.hf import HFBackend
from workers.generate import Candidate, GenerationBackend, GenerationConfig, PromptInput


@pytest.fixture
def prompts(noise_image):
    """Different lengths and different numbers of images, so the batch is left padded."""
    return [
        PromptInput(
            "two",
            "Image1:<image>\nImage2:<image>\nIn Image2, what colour is it?",
            [noise_image(300, 200, 1), noise_image(120, 400, 2)],
        ),
        PromptInput("one", "<image>\nIn Image1, why?", [noise_image(200, 200, 3)]),
        PromptInput(
            "three",
            "Image1:<image>\nImage2:<image>\nImage3:<image>\nIn Image3, who?",
            [noise_image(64, 64, i) for i in range(3)],
        ),
    ]


def assert_same_as_probe(handle, prompts, results, layers):
    """Every recorded ProbeResult equals a separate probe pass on the same prompt + lead + answer ids, for
    both `attention_rows` settings; `answer_tokens` is recorded exactly when generation ran the step at the
    answer's last token (it stopped, or wrote whitespace after it), and absent for an answer cut there."""
    flat = [(p, c) for p, candidates in zip(prompts, results, strict=True) for c in candidates]
    separate = probe(
        handle, [p for p, _ in flat], [c.token_ids for _, c in flat], layers=layers, batch_size=3,
        leads=[c.lead_ids for _, c in flat],
    )
    seen = set()
    for (_, candidate), expected in zip(flat, separate, strict=True):
        recorded = candidate.probe
        assert isinstance(recorded, ProbeResult)
        assert recorded.num_tokens == len(candidate.token_ids)
        assert recorded.layers == expected.layers
        assert recorded.image_token_counts == expected.image_token_counts
        assert recorded.image_spans == expected.image_spans and recorded.patch_grids == expected.patch_grids
        assert np.abs(recorded.values("producing") - expected.values("producing")).max() < 1e-5
        if "answer_tokens" in recorded.attention:
            assert np.abs(recorded.values("answer_tokens") - expected.values("answer_tokens")).max() < 1e-5
            assert recorded.next_max_logprob == pytest.approx(expected.next_max_logprob, abs=1e-5)
            seen.add("answer_tokens" if candidate.token_ids else "empty")
        else:  # generation never ran the step at the answer's last token: it was cut there
            assert candidate.finish_reason == "length" and recorded.next_max_logprob is None
            seen.add("cut")
        assert np.abs(recorded.token_logprobs - expected.token_logprobs).max() < 1e-5
        assert np.abs(recorded.max_logprobs - expected.max_logprobs).max() < 1e-5
        assert recorded.perplexity == pytest.approx(expected.perplexity, rel=1e-5)
        stopped = candidate.finish_reason == "stop"
        if recorded.num_tokens:
            assert recorded.official_perplexity(stopped) == pytest.approx(expected.official_perplexity(stopped), rel=1e-5)
    return seen


def test_backend_follows_the_protocol(tiny_llava, prompts):
    backend = HFBackend(tiny_llava)
    assert isinstance(backend, GenerationBackend) and backend.name == "hf"
    results = backend.generate(prompts, GenerationConfig(max_new_tokens=6, batch_size=2))
    assert len(results) == 3 and all(len(candidates) == 1 for candidates in results)
    tokenizer = tiny_llava.processor.tokenizer
    for prompt, (candidate,) in zip(prompts, results, strict=True):
        assert isinstance(candidate, Candidate)
        assert all(isinstance(t, int) for t in candidate.token_ids) and len(candidate.token_ids) <= 6
        assert candidate.finish_reason in {"stop", "length"}
        assert len(candidate.lead_ids) + len(candidate.token_ids) <= 6
        assert tokenizer.eos_token_id not in candidate.token_ids
        # The answer proper: stripped once, its ids those of the stripped text, whitespace before it apart.
        assert candidate.text == tokenizer.decode(candidate.token_ids, skip_special_tokens=True).strip()
        assert candidate.text == candidate.text.strip()
        assert not tokenizer.decode(candidate.lead_ids, skip_special_tokens=True).strip()
        assert len(candidate.probe.image_token_counts) == len(prompt.images)
    again = backend.generate(prompts, GenerationConfig(max_new_tokens=6, batch_size=2))
    assert [c[0].token_ids for c in again] == [c[0].token_ids for c in results]  # greedy
    backend.close()


def test_sampled_candidates_are_seeded(tiny_qwen, prompts):
    backend = HFBackend(tiny_qwen, record_attention=False)
    config = GenerationConfig(max_new_tokens=8, num_candidates=2, temperature=1.0, seed=7)
    results = backend.generate(prompts[:2], config)
    assert [len(c) for c in results] == [2, 2]
    assert all(c.probe is None for candidates in results for c in candidates)
    assert results[0][0].token_ids != results[0][1].token_ids
    again = backend.generate(prompts[:2], config)
    assert [[c.token_ids for c in cs] for cs in again] == [[c.token_ids for c in cs] for cs in results]
    other = backend.generate(
        prompts[:2], GenerationConfig(max_new_tokens=8, num_candidates=2, temperature=1.0, seed=8)
    )
    assert [[c.token_ids for c in cs] for cs in other] != [[c.token_ids for c in cs] for cs in results]


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
def test_recorded_attention_equals_the_separate_probe(family, tiny_llava, tiny_qwen, prompts):
    handle = {"llava": tiny_llava, "qwen2.5-vl": tiny_qwen}[family]
    greedy = HFBackend(handle, layers=[0, 1]).generate(prompts[:2], GenerationConfig(max_new_tokens=7))
    assert_same_as_probe(handle, prompts[:2], greedy, [0, 1])
    sampled_config = GenerationConfig(max_new_tokens=7, num_candidates=2, temperature=1.3, top_p=0.9, seed=1)
    sampled = HFBackend(handle).generate(prompts, sampled_config)
    assert [len(c) for c in sampled] == [2, 2, 2]
    assert_same_as_probe(handle, prompts, sampled, None)


def test_rows_after_a_sequence_stopped_are_ignored(tiny_qwen, prompts):
    backend = HFBackend(tiny_qwen, layers=[0, 1])
    config = GenerationConfig(max_new_tokens=8)
    free = backend.generate(prompts[:2], config)
    # Make the 3rd token greedy chooses for the first prompt an end-of-sequence token: that row
    # now stops early while the other keeps going (greedy does not change before the stop).
    stop_token = free[0][0].token_ids[2]
    generation_config = tiny_qwen.model.generation_config
    original = generation_config.eos_token_id
    generation_config.eos_token_id = [*original, stop_token]
    try:
        stopped = backend.generate(prompts[:2], config)
    finally:
        generation_config.eos_token_id = original
    for before, (after,) in zip(free, stopped, strict=True):
        tokens = before[0].token_ids
        cut = tokens.index(stop_token) if stop_token in tokens else len(tokens)
        assert after.token_ids == tokens[:cut]
        assert after.finish_reason == ("stop" if cut < len(tokens) else "length")
    first = stopped[0][0]
    assert first.finish_reason == "stop" and len(first.token_ids) <= 2
    assert len(stopped[1][0].token_ids) > len(first.token_ids)  # the batch went on after row 0 stopped
    seen = assert_same_as_probe(tiny_qwen, prompts[:2], stopped, [0, 1])
    assert seen == {"answer_tokens", "cut"}  # an EOS-terminated answer and one cut at max_new_tokens
