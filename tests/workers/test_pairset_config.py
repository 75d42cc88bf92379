"""The one mapping from a pair-set request (as the API stores it) to the pipeline's configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.schemas import PairSetCreate
from core.errors import UserError
from core.settings import Settings
from workers.augment import AugmentMix
from workers.generate import GenerationConfig
from workers.pipeline import NoiseSpec, PipelineConfig
from workers.postselect import PostSelectionConfig
from workers.select import SelectionConfig
from workers.tasks import pipeline_config


def _stored(**body: object) -> dict:
    """What the API records: the validated request, defaults filled in, as JSON."""
    return PairSetCreate.model_validate({"dataset_id": "ds_x", **body}).model_dump(mode="json")


def test_the_api_defaults_are_the_pipeline_defaults(tmp_path: Path) -> None:
    assert pipeline_config(_stored(), Settings(data_dir=tmp_path)) == PipelineConfig()


def test_every_field_reaches_its_stage(tmp_path: Path) -> None:
    request = _stored(
        model="tiny-qwen2.5-vl",
        preset="official_code",
        augmentation={"num": 30, "formats": ["grid", "sequence"], "mix": {"grid_counts": {"2": 1, "9": 3}}},
        generation={"max_new_tokens": 16, "num_candidates": 2, "temperature": 0.7, "top_p": 0.9, "batch_size": 4,
                    "noise": {"sequence": {"std": 30}}},
        selection={"thresholds": {"grid": {"9": 0.35}}, "attention_rows": "producing", "perplexity_gate": 1.5},
        post_selection={"k": 3, "edit_distance": True},
        seed=11,
        shard_size=7,
    )
    config = pipeline_config(request, Settings(data_dir=tmp_path))
    # Explicit fields win over the preset; the rest of the preset applies.
    assert config == PipelineConfig(
        model="tiny-qwen2.5-vl",
        num=30,
        formats=("grid", "sequence"),
        mix=AugmentMix(grid_counts={2: 1.0, 9: 3.0}),
        seed=11,
        generation=GenerationConfig(max_new_tokens=16, num_candidates=2, temperature=0.7, top_p=0.9, batch_size=4),
        selection=SelectionConfig(
            preset="official_code",
            thresholds={"grid": {9: 0.35}},
            attention_rows="producing",
            comparison={"sequence": "<=", "grid": "<", "pic_in_pic": "<"},
            perplexity_gate=1.5,
        ),
        post_selection=PostSelectionConfig(k=3.0, perplexity=False, length_ratio=False, edit_distance=True),
        shard_size=7,
        noise={"sequence": NoiseSpec(30.0, "target")},
        preset="official_code",
    )
    assert config.selection.threshold("grid", 9) == 0.35 and config.selection.threshold("grid", 2) == 0.7


@pytest.mark.parametrize("preset", ["paper", "official_code"])
def test_presets_are_complete(tmp_path: Path, preset: str) -> None:
    config = pipeline_config(_stored(preset=preset), Settings(data_dir=tmp_path))
    sel, post = config.selection, config.post_selection
    assert config.preset == sel.preset == preset
    assert sel.attention_rows == ("producing" if preset == "paper" else "answer_tokens")
    if preset == "paper":  # today's behaviour: <= everywhere, Tukey fences, no gate, no noise
        assert sel.comparison == {"sequence": "<=", "grid": "<=", "pic_in_pic": "<="} and sel.perplexity_gate is None
        assert (post.perplexity, post.length_ratio, post.edit_distance) == (True, True, True)
        assert config.noise == {} and sel.threshold("pic_in_pic", 2) == 0.6
    else:  # the official scripts: < for grid and pic-in-pic, ppl > 1.1 instead of the fences, the noise
        assert sel.comparison == {"sequence": "<=", "grid": "<", "pic_in_pic": "<"} and sel.perplexity_gate == 1.1
        assert (post.perplexity, post.length_ratio, post.edit_distance) == (False, False, False)
        assert config.noise == {"grid": NoiseSpec(225.0, "target"), "pic_in_pic": NoiseSpec(49.0, "image")}
        assert sel.threshold("pic_in_pic", 2) == 0.8 and sel.threshold("grid", 9) == 0.3
    # The card records the preset and every effective value.
    card = config.to_dict()
    assert card["preset"] == preset and card["selection"]["perplexity_gate"] == sel.perplexity_gate
    assert card["selection"]["comparison"] == sel.comparison and card["post_selection"]["length_ratio"] == post.length_ratio


def test_a_request_without_a_backend_gets_the_deployments(tmp_path: Path) -> None:
    endpoints = {"vllm": "http://vllm:8000/v1", "other": "http://other:8000/v1"}
    settings = Settings(data_dir=tmp_path, generation_backend="openai", generation_endpoints=endpoints, generation_endpoint="vllm")
    config = pipeline_config(_stored(), settings)
    assert (config.backend, config.endpoint, config.base_url) == ("openai", "vllm", "http://vllm:8000/v1")
    named = pipeline_config(_stored(generation={"backend": "openai", "endpoint": "other"}), settings)
    assert (named.endpoint, named.base_url) == ("other", "http://other:8000/v1")
    explicit = pipeline_config(_stored(generation={"backend": "hf"}), settings)
    assert (explicit.backend, explicit.base_url) == ("hf", None)
    with pytest.raises(UserError, match="no default one") as exc:
        pipeline_config(_stored(generation={"backend": "openai"}), Settings(data_dir=tmp_path))
    assert exc.value.code == "no_endpoint"
    with pytest.raises(UserError, match="not configured") as exc:
        pipeline_config(_stored(generation={"backend": "openai", "endpoint": "gone"}), settings)
    assert (exc.value.code, exc.value.param) == ("unknown_endpoint", "generation.endpoint")


def test_endpoints_from_the_environment_and_their_checks(tmp_path: Path) -> None:
    assert Settings(generation_endpoints="a=http://x/v1, b=https://y/v1").generation_endpoints == {"a": "http://x/v1", "b": "https://y/v1"}
    assert Settings(generation_endpoints='{"a": "http://x/v1"}').generation_endpoints == {"a": "http://x/v1"}
    for bad in ("a=ftp://x", "a", "../x=http://x"):
        with pytest.raises(ValueError):
            Settings(generation_endpoints=bad)
    with pytest.raises(ValueError, match="not one of"):
        Settings(generation_endpoints="a=http://x/v1", generation_endpoint="b")
