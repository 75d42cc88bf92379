"""The attention probe (DESIGN 2.4): equal to eager attention for both `attention_rows` settings, never an
L x L matrix, and the ratios."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import workers.attention as attention
from workers.attention import ProbeResult, probe, recipe_ratio, region_ratio, sequence_ratio
from workers.generate import PromptInput
from workers.models import TokenLayout, load_model


@pytest.fixture(scope="module")
def eager_models(tiny_model_settings):
    return {
        "llava": load_model("tiny-llava", tiny_model_settings, attn_implementation="eager"),
        "qwen2.5-vl": load_model("tiny-qwen2.5-vl", tiny_model_settings, attn_implementation="eager"),
    }


@pytest.fixture
def pairs(noise_image):
    """Three pairs: different image counts, prompt lengths and candidate lengths (one of a single token)."""
    prompts = [
        PromptInput(
            "a",
            "Image1:<image>\nImage2:<image>\nIn Image2, what is on the table?",
            [noise_image(500, 300, 1), noise_image(100, 900, 2)],
        ),
        PromptInput("b", "<image>\nIn Image1, why?", [noise_image(200, 200, 3)]),
        PromptInput(
            "c",
            "Image1:<image>\nImage2:<image>\nImage3:<image>\nIn Image1, who?",
            [noise_image(64, 64, i) for i in range(3)],
        ),
    ]
    candidates = [[70, 71, 72, 73, 74, 75, 76], [80], [90, 91, 92]]
    return prompts, candidates


def eager_reference(handle, prompt, candidate, lead=()):
    """Eager `output_attentions=True` on one unpadded pair prompt + lead + candidate (T tokens at the end).

    Returns, per `attention_rows` setting, the per-layer (heads-averaged, rows x image keys) attention:
    `producing` reads rows L-T-1 .. L-2 (the rows whose outputs predict the candidate's tokens),
    `answer_tokens` rows L-T .. L-1 (the rows at the candidate's tokens, as the official code's
    `generate(...).attentions[1:]`); and the token log-probs and max log-probs of the producing rows.
    """
    enc = handle.family.encode(handle.processor, [prompt], [[*lead, *candidate]])
    kwargs = {}
    if (position_ids := handle.family.position_ids(enc.inputs)) is not None:
        kwargs["position_ids"] = position_ids
    with torch.no_grad():
        out = handle.model(**enc.inputs, output_attentions=True, **kwargs)
    length, count = enc.seq_len, len(candidate)
    keys = enc.image_positions(0)
    row_sets = {
        "producing": list(range(length - count - 1, length - 1)),
        "answer_tokens": list(range(length - count, length)),
    }
    per_layer = {
        name: [layer[0][:, rows][:, :, keys].double().mean(dim=0) for layer in out.attentions]
        for name, rows in row_sets.items()
    }
    steps = out.logits[0, row_sets["producing"]].double().log_softmax(-1)
    logprobs = steps[torch.arange(count), torch.tensor(candidate)].numpy()
    return per_layer, logprobs, steps.max(-1).values.numpy()


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
def test_probe_equals_eager_attention(family, eager_models, tiny_llava, tiny_qwen, pairs):
    handle = {"llava": tiny_llava, "qwen2.5-vl": tiny_qwen}[family]
    prompts, candidates = pairs
    references = [
        eager_reference(eager_models[family], p, c) for p, c in zip(prompts, candidates, strict=True)
    ]
    for layers in ([0], [1], [0, 1], None):
        results = probe(handle, prompts, candidates, layers=layers, batch_size=3)
        expected_layers = tuple(layers) if layers else (1,)  # default: the middle of 2 layers
        for prompt, result, (per_layer, logprobs, best) in zip(prompts, results, references, strict=True):
            assert result.layers == expected_layers
            for rows in ("producing", "answer_tokens"):
                attn = torch.stack([per_layer[rows][i] for i in expected_layers]).mean(dim=0).mean(dim=0).numpy()
                values = result.values(rows)
                assert values.dtype == np.float64 and values.shape == attn.shape
                assert np.abs(values - attn).max() < 1e-5
                assert 0 < values.sum() <= 1
            assert np.abs(result.token_logprobs - logprobs).max() < 1e-5
            assert np.abs(result.max_logprobs - best).max() < 1e-5
            assert result.perplexity == pytest.approx(math.exp(-logprobs.mean()), rel=1e-5)
            assert len(result.image_token_counts) == len(prompt.images) == len(result.patch_grids)
            assert sum(result.image_token_counts) == attn.shape[0]
    # The two settings read different rows: for the one-token candidate, `producing` is the prompt's last
    # row alone (the same whatever the answer), `answer_tokens` the row at the answer's token.
    one = probe(handle, prompts[1:2] * 2, [[80], [81]], batch_size=2)
    assert np.array_equal(one[0].values("producing"), one[1].values("producing"))
    assert not np.allclose(one[0].values("answer_tokens"), one[1].values("answer_tokens"))


def test_probe_reads_the_answer_after_its_lead(eager_models, tiny_llava, pairs):
    """Tokens the model wrote before its answer (a leading space) stand in the sequence but are no answer token."""
    prompts, candidates = pairs
    lead = [32]
    result = probe(tiny_llava, prompts[:1], candidates[:1], leads=[lead])[0]
    per_layer, logprobs, _ = eager_reference(eager_models["llava"], prompts[0], candidates[0], lead)
    for rows in ("producing", "answer_tokens"):
        assert np.abs(result.values(rows) - per_layer[rows][1].mean(dim=0).numpy()).max() < 1e-5
    assert result.num_tokens == len(candidates[0]) and np.abs(result.token_logprobs - logprobs).max() < 1e-5


def test_probe_batching_and_row_chunks_do_not_change_results(tiny_qwen, pairs, monkeypatch):
    prompts, candidates = pairs
    together = probe(tiny_qwen, prompts, candidates, layers=[0, 1], batch_size=3)
    alone = probe(tiny_qwen, prompts, candidates, layers=[0, 1], batch_size=1)
    monkeypatch.setattr(attention, "_SCORE_CHUNK_ELEMENTS", 1)  # one query row per chunk
    chunked = probe(tiny_qwen, prompts, candidates, layers=[0, 1], batch_size=3)
    for a, b, c in zip(together, alone, chunked, strict=True):
        for rows in ("producing", "answer_tokens"):
            assert np.abs(a.values(rows) - b.values(rows)).max() < 1e-6
            assert np.abs(a.values(rows) - c.values(rows)).max() < 1e-9  # float32 rounding only
        assert np.abs(a.token_logprobs - b.token_logprobs).max() < 1e-5


def test_probe_spans_are_prompt_positions(tiny_llava, pairs):
    prompts, candidates = pairs
    result = probe(tiny_llava, prompts[:1], candidates[:1])[0]
    enc = tiny_llava.family.encode(tiny_llava.processor, prompts[:1])
    assert result.image_spans == tuple(enc.image_spans[0]) and result.image_token_counts == (576, 576)
    assert result.patch_grids == ((24, 24), (24, 24))
    assert result.image(1, "producing").shape == (576,)
    assert np.array_equal(result.image(1, "answer_tokens"), result.values("answer_tokens")[576:])


def test_recording_attention_leaves_the_outputs_alone(tiny_llava, pairs):
    prompts, candidates = pairs
    model = tiny_llava.model
    enc = tiny_llava.family.encode(tiny_llava.processor, prompts[:2], candidates[:2])
    position_ids = tiny_llava.family.position_ids(enc.inputs)
    model.set_attn_implementation({"text_config": "sdpa"})
    with torch.no_grad():
        reference = model(**enc.inputs, position_ids=position_ids).logits
    probe(tiny_llava, prompts[:1], candidates[:1])  # switches the language model to the recording function
    assert model.config.text_config._attn_implementation == attention.ATTN_IMPLEMENTATION
    assert model.config.vision_config._attn_implementation == "sdpa"  # the vision tower is untouched
    with torch.no_grad():
        assert torch.equal(model(**enc.inputs, position_ids=position_ids).logits, reference)


def test_empty_candidate_and_bad_arguments(tiny_qwen, pairs):
    prompts, _ = pairs
    empty = probe(tiny_qwen, prompts[:1], [[]])[0]
    assert empty.num_tokens == 0 and math.isnan(empty.perplexity) and math.isnan(empty.official_perplexity(True))
    for rows in ("producing", "answer_tokens"):
        values = empty.values(rows)
        assert values.shape == (sum(empty.image_token_counts),) and values.sum() == 0
        assert math.isnan(sequence_ratio(empty, 0, rows))
    with pytest.raises(ValueError, match="layers"):
        probe(tiny_qwen, prompts[:1], [[1]], layers=[2])
    assert probe(tiny_qwen, prompts[:1], [[1]], layers=[-1])[0].layers == (1,)
    with pytest.raises(ValueError, match="candidates"):
        probe(tiny_qwen, prompts, [[1]])


# -- ratios, from plain values ----------------------------------------------------------------------


def square_layout(size: int = 28) -> TokenLayout:
    return TokenLayout(
        image_size=(size, size), rows=2, cols=2, cell=(14.0, 14.0), scale=(1.0, 1.0), offset=(0.0, 0.0)
    )


def make_result(values, counts, layouts=None) -> ProbeResult:
    values = np.asarray(values, dtype=np.float64)
    return ProbeResult(
        attention={"answer_tokens": values, "producing": values[::-1].copy()},
        image_token_counts=tuple(counts),
        image_spans=(),
        patch_grids=(),
        layouts=tuple(layouts or ()),
        token_logprobs=np.log([0.5, 0.25]),
        layers=(1,),
        max_logprobs=np.log([0.5, 0.8]),
        next_max_logprob=math.log(0.9),
    )


def test_sequence_ratio():
    result = make_result([0.1, 0.1, 0.3, 0.2, 0.1], [2, 3])
    assert sequence_ratio(result, 0, "answer_tokens") == pytest.approx(0.2 / 0.8)
    assert sequence_ratio(result, 1, "answer_tokens") == pytest.approx(0.6 / 0.8)
    assert sequence_ratio(result, 0, "producing") == pytest.approx(0.3 / 0.8)  # the other rows' values
    assert recipe_ratio(result, "sequence", 1, rows="answer_tokens") == sequence_ratio(result, 1, "answer_tokens")
    assert result.perplexity == pytest.approx(math.sqrt(8))
    with pytest.raises(IndexError):
        sequence_ratio(result, 2, "answer_tokens")
    with pytest.raises(ValueError, match="attention_rows"):
        result.values("all")


def test_official_perplexity_uses_max_softmax_and_the_eos_step():
    result = make_result([0.1, 0.1], [2])
    # exp(-mean(log 0.5, log 0.8)), and with the EOS step's max probability 0.9 for an answer that stopped.
    assert result.official_perplexity(stopped=False) == pytest.approx((0.5 * 0.8) ** -0.5)
    assert result.official_perplexity(stopped=True) == pytest.approx((0.5 * 0.8 * 0.9) ** (-1 / 3))
    # The paper's statistic stays the chosen tokens' perplexity.
    assert result.perplexity == pytest.approx((0.5 * 0.25) ** -0.5)


def test_region_ratio_weights_tokens_by_their_area_in_the_box():
    result = make_result([0.4, 0.1, 0.2, 0.3], [4], [square_layout()])
    # Tokens row-major: (0,0)=0.4 (0,1)=0.1 (1,0)=0.2 (1,1)=0.3.
    rows = "answer_tokens"
    assert region_ratio(result, 0, (28, 28), (0, 0, 14, 28), rows) == pytest.approx(0.6)  # left column
    # Top row, 1.5 tokens wide: all of (0,0), half of (0,1).
    assert region_ratio(result, 0, (28, 28), (0, 0, 21, 14), rows) == pytest.approx(0.4 + 0.05)
    assert recipe_ratio(result, "grid", 0, (28, 28), (14, 14, 28, 28), rows=rows) == pytest.approx(0.3)
    assert recipe_ratio(result, "pic_in_pic", 0, (28, 28), (7, 7, 21, 21), rows=rows) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="image_size"):
        region_ratio(result, 0, (30, 28), (0, 0, 14, 28), rows)
    with pytest.raises(ValueError, match="format"):
        recipe_ratio(result, "collage", 0, (28, 28), (0, 0, 1, 1), rows=rows)
    with pytest.raises(ValueError, match="needs"):
        recipe_ratio(result, "grid", 0, rows=rows)
    two = make_result([0.1] * 8, [4, 4], [square_layout(), square_layout()])
    with pytest.raises(ValueError, match="one image"):
        recipe_ratio(two, "grid", 0, (28, 28), (0, 0, 1, 1), rows=rows)


def test_candidates_holding_an_image_placeholder_are_refused(tiny_llava, pairs):
    prompts, _ = pairs
    with pytest.raises(ValueError, match="placeholder"):
        probe(tiny_llava, prompts[:1], [[65, tiny_llava.processor.image_token_id]])


def test_text_only_prompt_has_no_image_tokens(tiny_qwen):
    result = probe(tiny_qwen, [PromptInput("t", "Hello there.", [])], [[72, 105]])[0]
    assert result.image_token_counts == () and result.values("producing").shape == (0,)
    assert result.num_tokens == 2 and np.isfinite(result.perplexity)
