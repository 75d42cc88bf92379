"""Fixtures for the trainer tests: tiny models built once, and small pair-set exports written directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.settings import Settings
from workers.export import ExportPair, ShardWriter

FAMILIES = ("tiny-llava", "tiny-qwen2.5-vl")
ANSWERS = [("A red circle.", "A blue square."), ("Two shapes.", "Three triangles."),
           ("On the left.", "In the middle."), ("Green.", "Purple and orange.")]


def write_export(out_dir: Path, num_pairs: int, images_per_prompt: int = 1, size: int = 56, seed: int = 0) -> Path:
    """A pair-set export of `num_pairs` rows with `images_per_prompt` noise images each (sequence prompts)."""
    rng = np.random.default_rng(seed)
    writer = ShardWriter(out_dir, rows_per_shard=max(1, num_pairs // 2))  # two shards: loading reads them all
    for i in range(num_pairs):
        images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(images_per_prompt)]
        tags = "".join(f"Image {k + 1}: <image>\n" for k in range(images_per_prompt))
        chosen, rejected = ANSWERS[i % len(ANSWERS)]
        writer.add(ExportPair(
            uid=f"p{i}", source_id=f"s{i}", format="sequence" if images_per_prompt > 1 else "single",
            target_index=0, prompt=f"{tags}What is in image 1?", images=images, chosen=chosen, rejected=rejected,
            attention_ratio=0.5, perplexity=3.0, length_ratio=1.0, edit_distance=0.5,
        ))
    writer.close()
    return out_dir


@pytest.fixture(scope="session")
def tiny_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def pair_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One 8-pair export per family (the same rows: the export does not depend on the model)."""
    root = write_export(tmp_path_factory.mktemp("export"), num_pairs=8)
    return dict.fromkeys(FAMILIES, root)
