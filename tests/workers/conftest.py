"""Shared fixtures for the worker tests."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from core.settings import Settings

# -- tiny models (workers/models, attention, hf backend) ------------------------------------------
# Built once per session into a temporary data dir, loaded with from_pretrained from there.


@pytest.fixture(scope="session")
def tiny_model_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_llava(tiny_model_settings: Settings):
    from workers.models import load_model

    return load_model("tiny-llava", tiny_model_settings)


@pytest.fixture(scope="session")
def tiny_qwen(tiny_model_settings: Settings):
    from workers.models import load_model

    return load_model("tiny-qwen2.5-vl", tiny_model_settings)


@pytest.fixture(scope="session")
def noise_image():
    """noise_image(width, height, seed) -> a reproducible random RGB image."""

    def make(width: int, height: int, seed: int = 0) -> Image.Image:
        pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
        return Image.fromarray(pixels)

    return make


# -- an OpenAI-compatible server: `transformers serve` on the same tiny model (a real process) -----


@pytest.fixture(scope="session")
def served_tiny_llava(tiny_llava, tmp_path_factory: pytest.TempPathFactory):
    """`transformers serve` on tiny_llava's own folder, for the session: (base URL, served model name)."""
    from pathlib import Path

    from tests.workers.servers import transformers_serve

    model_dir = Path(tiny_llava.model.name_or_path)
    with transformers_serve(model_dir, tmp_path_factory.mktemp("transformers-serve") / "serve.log") as url:
        yield url, str(model_dir)
