"""Fidelity on real checkpoints (FIDELITY.md, docs/fidelity.md): what the tiny models used to hide.

- LLaVA-1.5's processor centre-crops: the family pads every rendered image to a square first, so every
  grid cell and the pic-in-pic inset reach the model's tokens whole (the unpadded crop is shown too).
- One chat template per family: the prompt ids TRL's collator trains on (the export, the processor the
  family loads) are the ids generation and the attention pass used, BOS included.
- Answers are stripped once: the exported chosen and rejected texts carry no surrounding whitespace.
"""

from __future__ import annotations

import glob

import numpy as np
import pytest
import torch
from datasets import load_dataset
from PIL import Image

from core.dataset import read_samples
from core.store import ArtifactStore
from workers.augment import PIP_PHRASES, AugmentMix, Recipe, SourceImage, build_prompt
from workers.backends.hf import HFBackend
from workers.generate import GenerationConfig, PromptInput
from workers.ingest import IngestLimits, ingest
from workers.models import load_model, region_weights
from workers.pipeline import PipelineConfig, merge_and_export, model_fit, process_shard, write_records
from workers.postselect import PostSelectionConfig
from workers.render import GRID_SHAPES, image_boxes, render_recipe, store_loader, target_box
from workers.sample_data import write_sample_data
from workers.select import SelectionConfig

LLAVAS = ("tiny-llava", "tiny-llava-hf")
COLOURS = [(230, 20, 20), (20, 200, 40), (30, 60, 230), (240, 200, 20), (150, 40, 190), (250, 130, 20),
           (20, 200, 200), (120, 70, 30), (250, 100, 180)]  # fmt: skip


@pytest.fixture(scope="module")
def llavas(tiny_model_settings):
    return {name: load_model(name, tiny_model_settings) for name in LLAVAS}


def _recipe(fmt: str, sizes: list[tuple[int, int]]) -> tuple[Recipe, dict[str, Image.Image]]:
    """A recipe over solid-colour images of these sizes (sequence/grid: display order; pip: background, inset)."""
    refs = {f"{i:064x}": Image.new("RGB", size, COLOURS[i]) for i, size in enumerate(sizes)}
    images = tuple(SourceImage(ref, im.width, im.height, f"s{i}") for i, (ref, im) in enumerate(refs.items()))
    target = 1 if fmt == "pic_in_pic" else len(images) - 1
    phrase = PIP_PHRASES[0] if fmt == "pic_in_pic" else None
    prompt = build_prompt(fmt, len(images), target, "What is it?", phrase)
    return Recipe("0-0000000", 0, 0, fmt, "s", "What is it?", "A.", images, target, prompt, phrase), refs


def _boxes(recipe: Recipe) -> list[tuple[int, int, int, int]]:
    """Every region whose pixels must reach the model: each grid cell, or the pic-in-pic inset."""
    if recipe.format == "grid":
        from workers.render import grid_layout

        return list(grid_layout(recipe.n_images).cells)
    box = target_box(recipe)
    assert box is not None
    return [box]


def _cases():
    landscape, portrait = (384, 288), (240, 320)
    for n in GRID_SHAPES:
        yield "grid", [landscape if i % 2 else portrait for i in range(n)]
    yield "pic_in_pic", [landscape, portrait]
    yield "pic_in_pic", [portrait, landscape]


@pytest.mark.parametrize("name", LLAVAS)
def test_padding_brings_every_cell_and_the_inset_to_the_tokens(llavas, name):
    handle = llavas[name]
    family, processor = handle.family, handle.processor
    patch = int(processor.patch_size)
    for fmt, sizes in _cases():
        recipe, refs = _recipe(fmt, sizes)
        rendered = render_recipe(recipe, lambda ref, refs=refs: refs[ref].copy())
        fitted, offsets = family.fit_images(processor, rendered)
        (image,), ((dx, dy),) = fitted, offsets
        side = image.width
        assert image.height == side and max(rendered[0].size) == side  # a square, the render inside it
        enc = family.encode(processor, [PromptInput("p", recipe.prompt, fitted)])
        (layout,) = enc.layouts[0]
        pixels = enc.inputs["pixel_values"][0].double()  # (3, 336, 336) as the vision tower gets them
        mean = torch.tensor(processor.image_processor.image_mean).double()[:, None, None]
        std = torch.tensor(processor.image_processor.image_std).double()[:, None, None]
        rgb = ((pixels * std + mean) * 255).clamp(0, 255)
        for k, (left, top, right, bottom) in enumerate(_boxes(recipe)):
            box = (left + dx, top + dy, right + dx, bottom + dy)
            weights = region_weights(layout, box)
            # The box's tokens weigh exactly its share of the padded square: nothing of it is cropped.
            share = (right - left) * (bottom - top) / side**2
            assert weights.sum() / layout.num_tokens == pytest.approx(share, rel=1e-9), (fmt, len(sizes), k)
            # And the pixels are there: the patches wholly inside the image pasted there show its colour.
            boxes = image_boxes(recipe)
            assert boxes is not None
            pl, pt, pr, pb = boxes[k] if fmt == "grid" else boxes[recipe.target_index]
            inside = region_weights(layout, (pl + dx, pt + dy, pr + dx, pb + dy)).reshape(layout.rows, layout.cols) == 1
            rows, cols = np.nonzero(inside)
            assert len(rows) > 0, (fmt, len(sizes), k)
            colour = COLOURS[k] if fmt == "grid" else COLOURS[recipe.target_index]
            for r, c in zip(rows[:: max(1, len(rows) // 7)], cols[:: max(1, len(rows) // 7)], strict=True):
                seen = rgb[:, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch].mean(dim=(1, 2))
                assert torch.allclose(seen, torch.tensor(colour).double(), atol=3), (fmt, len(sizes), k, seen)


def test_without_padding_the_crop_cuts_the_outer_cells(llavas):
    """The defect the padding fixes, measured the same way: a 1x3 collage through the bare processor."""
    handle = llavas["tiny-llava-hf"]
    recipe, refs = _recipe("grid", [(384, 288)] * 3)
    (collage,) = render_recipe(recipe, lambda ref: refs[ref].copy())
    enc = handle.family.encode(handle.processor, [PromptInput("p", recipe.prompt, [collage])])
    (layout,) = enc.layouts[0]
    visible = []
    for left, top, right, bottom in _boxes(recipe):
        share = (right - left) * (bottom - top) / (collage.height * collage.height)  # of the cropped square
        visible.append(region_weights(layout, (left, top, right, bottom)).sum() / layout.num_tokens / share)
    assert visible[1] == pytest.approx(1.0, abs=1e-3)
    assert visible[0] < 0.1 and visible[2] < 0.1  # 6 % / 100 % / 5 %: the outer cells are gone


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model_settings):
    """Per model, a small pair set of each format made by the pipeline (every answer that differs from the
    truth becomes a pair) and exported; with the shard records and the model."""
    root = tmp_path_factory.mktemp("fidelity")
    store = ArtifactStore(root / "store")
    write_sample_data(root / "sd", num_samples=12, seed=3)
    ingest(root / "sd", store, "ds", limits=IngestLimits(10**9, 1000, 200.0, 10**8, 512))
    samples = read_samples(store, "ds")
    load = store_loader(store)
    every = SelectionConfig(thresholds={"sequence": dict.fromkeys((2, 3, 4, 5), 1.0), "grid": dict.fromkeys((2, 3, 4, 6, 9), 1.0), "pic_in_pic": {2: 1.0}})
    out = {}
    for name in ("tiny-llava", "tiny-llava-hf", "tiny-qwen2.5-vl"):
        handle = load_model(name, tiny_model_settings)
        records, paths = [], []
        for seed, fmt in enumerate(("sequence", "grid", "pic_in_pic"), start=4):  # one prompt of each format
            config = PipelineConfig(
                model=name, num=1, seed=seed, formats=(fmt,), mix=AugmentMix(sequence_counts={2: 1.0}, grid_counts={3: 1.0}),
                generation=GenerationConfig(max_new_tokens=4), selection=every,
                post_selection=PostSelectionConfig(perplexity=False, length_ratio=False, edit_distance=False),
            )  # fmt: skip
            shard = process_shard(samples, config, 0, 1, handle=handle, backend=HFBackend(handle), load=load)
            paths.append(root / name / "shards" / f"{seed:05d}.jsonl")
            write_records(paths[-1], shard)
            records += shard
        merge_and_export(paths, config, root / name / "export", load, model_fit(handle))
        files = sorted(glob.glob(str(root / name / "export" / "data" / "*.parquet")))
        out[name] = (handle, load_dataset("parquet", data_files=files, split="train"), records, samples, load)
    return out


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-llava-hf", "tiny-qwen2.5-vl"])
def test_training_sees_the_prompt_ids_generation_saw(exports, name):
    """TRL's collator on the export, with the processor the family loads, gives each row the prompt ids (BOS
    included) and the pixels that generation and the attention pass used for that prompt."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    handle, ds, records, _, load = exports[name]
    assert {row["format"] for row in ds} == {"sequence", "grid", "pic_in_pic"}
    collator = DataCollatorForVisionPreference(handle.processor)
    by_uid = {r["uid"]: Recipe.from_dict(r["recipe"]) for r in records}
    fit = model_fit(handle)
    tokenizer = handle.processor.tokenizer
    for row in ds:
        batch = collator([dict(row)])
        recipe = by_uid[row["uid"]]
        # What generation and the probe encode for this prompt (generation saw these pixels: no noise here).
        enc = handle.family.encode(handle.processor, [PromptInput(recipe.uid, recipe.prompt, fit(render_recipe(recipe, load))[0])])
        expected = enc.inputs["input_ids"][0].tolist()
        for b in range(2):  # chosen, rejected: both after the same prompt
            live = batch["attention_mask"][b].bool() & ~batch["completion_mask"][b].bool()
            assert batch["input_ids"][b][live].tolist() == expected, (name, row["uid"], row["format"])
        if tokenizer.bos_token_id is not None and "llava" in name:
            assert expected[0] == tokenizer.bos_token_id and expected.count(tokenizer.bos_token_id) == 1
        pixels = enc.inputs["pixel_values"]  # the collator repeats the images for chosen and rejected
        assert torch.equal(batch["pixel_values"][: pixels.shape[0]], pixels)
        # The completion is the answer as the template renders it after the prompt, then the end of turn.
        chosen = batch["input_ids"][0][batch["completion_mask"][0].bool()].tolist()
        answer = tokenizer(row["chosen"][0]["content"][0]["text"], add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(chosen).strip().startswith(tokenizer.decode(answer).strip())


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2.5-vl"])
def test_exported_answers_are_stripped_and_are_the_right_ones(exports, name):
    _, ds, records, samples, _ = exports[name]
    by_uid = {r["uid"]: r for r in records}
    truth = {s.id: s.answer for s in samples}
    assert len(ds) > 0
    for row in ds:
        chosen, rejected = row["chosen"][0]["content"][0]["text"], row["rejected"][0]["content"][0]["text"]
        assert chosen == chosen.strip() and rejected == rejected.strip() and chosen and rejected
        rec = by_uid[row["uid"]]
        assert chosen == truth[row["source_id"]].strip()
        assert rejected == rec["candidates"][rec["rejected"]]["text"]
