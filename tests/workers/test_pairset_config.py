"""The one mapping from a pair-set request (as the API stores it) to the pipeline's configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.schemas import PairSetCreate
from core.errors import UserError
from core.settings import Settings
from workers.augment import AugmentMix
from workers.generate import GenerationConfig
from workers.pipeline import PipelineConfig
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
        augmentation={"num": 30, "formats": ["grid", "sequence"], "mix": {"grid_counts": {"2": 1, "9": 3}}},
        generation={"max_new_tokens": 16, "num_candidates": 2, "temperature": 0.7, "top_p": 0.9, "batch_size": 4,
                    "noise_std": 30, "noise_formats": ["sequence", "grid"]},
        selection={"preset": "official_code", "thresholds": {"grid": {"9": 0.35}}},
        post_selection={"k": 3, "edit_distance": False},
        seed=11,
        shard_size=7,
    )
    config = pipeline_config(request, Settings(data_dir=tmp_path))
    assert config == PipelineConfig(
        model="tiny-qwen2.5-vl",
        num=30,
        formats=("grid", "sequence"),
        mix=AugmentMix(grid_counts={2: 1.0, 9: 3.0}),
        seed=11,
        generation=GenerationConfig(max_new_tokens=16, num_candidates=2, temperature=0.7, top_p=0.9, batch_size=4),
        selection=SelectionConfig(preset="official_code", thresholds={"grid": {9: 0.35}}),
        post_selection=PostSelectionConfig(k=3.0, edit_distance=False),
        shard_size=7,
        noise_std=30.0,
        noise_formats=("sequence", "grid"),
    )
    assert config.selection.threshold("grid", 9) == 0.35 and config.selection.threshold("grid", 2) == 0.7


def test_a_record_from_before_noise_gets_none(tmp_path: Path) -> None:
    stored = _stored(generation={"noise_std": 30})
    for key in ("noise_std", "noise_formats"):
        del stored["generation"][key]
    config = pipeline_config(stored, Settings(data_dir=tmp_path))
    assert (config.noise_std, config.noise_formats) == (0.0, ("grid", "pic_in_pic"))


def test_a_request_without_a_backend_gets_the_deployments(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, generation_backend="openai", openai_base_url="http://vllm:8000/v1")
    config = pipeline_config(_stored(), settings)
    assert (config.backend, config.base_url) == ("openai", "http://vllm:8000/v1")
    explicit = pipeline_config(_stored(generation={"backend": "hf"}), settings)
    assert (explicit.backend, explicit.base_url) == ("hf", None)
    with pytest.raises(UserError, match="needs base_url") as exc:
        pipeline_config(_stored(generation={"backend": "openai"}), Settings(data_dir=tmp_path))
    assert exc.value.code == "invalid_config"
