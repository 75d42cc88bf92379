"""Augmentation recipes: prompt rewrites, image counts, mix, determinism, distractors, validation."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest

from core.dataset import Sample
from core.errors import UserError
from workers.augment import (
    FORMATS,
    IMAGE_COUNTS,
    PIP_PHRASES,
    AugmentMix,
    Recipe,
    SourceImage,
    build_prompt,
    has_box_coordinates,
    make_recipe,
    make_recipes,
    rewrite_question,
)


def ref(i: int) -> str:
    return hashlib.sha256(f"image-{i}".encode()).hexdigest()


def dataset(n: int, images: int | None = None) -> list[Sample]:
    """n samples over `images` distinct images (default: one each), sizes varying."""
    images = images or n
    return [
        Sample(
            id=f"s{i}",
            image=ref(i % images),
            width=640 - (i % images),
            height=480,
            question=f"<image>\nWhat is in picture {i}?",
            answer=f"Answer {i}.",
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------- prompts


def test_pip_phrases_are_distinct_variants():
    assert 80 <= len(PIP_PHRASES) <= 100
    assert len(set(PIP_PHRASES)) == len(PIP_PHRASES)
    assert "For the image in the center" in PIP_PHRASES
    for p in PIP_PHRASES:
        assert p == p.strip() and not p.endswith(",") and p[0].isupper() and "<image>" not in p


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("<image>\nWhat is the man holding?", "what is the man holding?"),
        ("What is the man holding?\n<image>", "what is the man holding?"),
        ("  <image>\n\nWhat is it?  ", "what is it?"),
        ("Describe <image> this.", "describe this."),
        ("what is it?", "what is it?"),
        ("<image>", ""),
    ],
)
def test_rewrite_question(question, expected):
    assert rewrite_question(question) == expected
    assert rewrite_question(rewrite_question(question)) == expected


def test_sequence_prompt_exact():
    prompt = build_prompt("sequence", 3, 1, "<image>\nWhat is the man holding?")
    assert prompt == "Image1:<image>\nImage2:<image>\nImage3:<image>\nIn Image2, what is the man holding?"
    prompt = build_prompt("sequence", 5, 4, "How Many dogs?\n<image>")
    assert prompt == (
        "Image1:<image>\nImage2:<image>\nImage3:<image>\nImage4:<image>\nImage5:<image>\nIn Image5, how Many dogs?"
    )


def test_grid_prompt_exact():
    assert (
        build_prompt("grid", 4, 3, "What is on the table?\n<image>")
        == "<image>\nIn Image4, what is on the table?"
    )
    assert build_prompt("grid", 9, 0, "<image>\nIs it sunny?") == "<image>\nIn Image1, is it sunny?"


def test_pic_in_pic_prompt_exact():
    prompt = build_prompt(
        "pic_in_pic", 2, 1, "<image>\nWhat colour is the car?", "For the image in the center"
    )
    assert prompt == "<image>\nFor the image in the center, what colour is the car?"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("collage", 2, 0, "q"), "format"),
        (("grid", 5, 0, "q"), "n_images"),
        (("sequence", 6, 0, "q"), "n_images"),
        (("pic_in_pic", 3, 1, "q", "For the image in the center"), "n_images"),
        (("grid", 4, 4, "q"), "target_index"),
        (("pic_in_pic", 2, 1, "q"), "phrase"),
    ],
)
def test_build_prompt_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        build_prompt(*args)


# ---------------------------------------------------------------------------------------------- recipes


def test_recipes_are_consistent():
    samples = dataset(30)
    by_id = {s.id: s for s in samples}
    recipes = make_recipes(samples, 300, seed=5)
    assert {r.format for r in recipes} == set(FORMATS)
    for r in recipes:
        assert r.uid == f"5-{r.index:07d}"
        assert r.n_images in IMAGE_COUNTS[r.format]
        assert r.prompt.count("<image>") == r.n_prompt_images == (r.n_images if r.format == "sequence" else 1)
        assert r.prompt == build_prompt(r.format, r.n_images, r.target_index, r.question, r.phrase)
        source = by_id[r.sample_id]
        assert r.images[r.target_index] == SourceImage(source.image, source.width, source.height, source.id)
        assert (r.question, r.answer) == (source.question.removeprefix("<image>\n"), source.answer)
        if r.format == "pic_in_pic":
            assert r.target_index == 1 and r.phrase in PIP_PHRASES
            assert r.prompt.startswith(f"<image>\n{r.phrase}, what is in picture")
        else:
            assert r.phrase is None
            assert f"In Image{r.target_index + 1}, what is in picture" in r.prompt


def test_recipe_dict_round_trip_through_json():
    for r in make_recipes(dataset(10), 30, seed=2):
        assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_recipe_rejects_inconsistent_fields():
    r = make_recipes(dataset(10), 1, seed=0, mix=AugmentMix().only(["grid"]))[0]
    fields = r.to_dict()
    with pytest.raises(ValueError, match="image tokens"):
        Recipe.from_dict({**fields, "prompt": "no token"})
    with pytest.raises(ValueError, match="target_index"):
        Recipe.from_dict({**fields, "target_index": r.n_images})


def test_mix_proportions_are_followed():
    recipes = make_recipes(dataset(40), 4000, seed=11)
    formats = Counter(r.format for r in recipes)
    for fmt, weight in {"sequence": 62, "grid": 90, "pic_in_pic": 49}.items():
        assert formats[fmt] / len(recipes) == pytest.approx(weight / 201, abs=0.03)
    for fmt, expected in (("sequence", AugmentMix().sequence_counts), ("grid", AugmentMix().grid_counts)):
        counts = Counter(r.n_images for r in recipes if r.format == fmt)
        total = sum(counts.values())
        for n, weight in expected.items():
            assert counts[n] / total == pytest.approx(weight / 100, abs=0.04), (fmt, n)
    targets = Counter(r.target_index for r in recipes if r.format == "grid" and r.n_images == 2)
    assert targets[0] / sum(targets.values()) == pytest.approx(0.5, abs=0.06)


def test_restricted_mix_only_draws_its_formats():
    mix = AugmentMix(grid_counts={9: 1.0}).only(["grid"])
    recipes = make_recipes(dataset(12), 50, seed=3, mix=mix)
    assert {(r.format, r.n_images) for r in recipes} == {("grid", 9)}


def test_same_seed_same_recipes_and_shards_agree():
    samples = dataset(25)
    whole = make_recipes(samples, 60, seed=42)
    assert make_recipes(samples, 60, seed=42) == whole
    assert make_recipes(samples, 35, seed=42) + make_recipes(samples, 25, seed=42, start=35) == whole
    assert make_recipe(samples, 47, 42, AugmentMix()) == whole[47]


def test_different_seed_different_recipes():
    samples = dataset(25)
    a, b = make_recipes(samples, 40, seed=1), make_recipes(samples, 40, seed=2)
    differ = sum(
        (x.sample_id, x.images, x.prompt) != (y.sample_id, y.images, y.prompt)
        for x, y in zip(a, b, strict=True)
    )
    assert differ > 30


def test_sources_cycle_through_the_dataset_evenly():
    samples = dataset(20)
    recipes = make_recipes(samples, 60, seed=9)
    assert Counter(r.sample_id for r in recipes) == {s.id: 3 for s in samples}
    assert [r.sample_id for r in recipes[:20]] != [s.id for s in samples]  # shuffled, not in file order


def test_distractors_are_distinct_and_never_the_target():
    for r in make_recipes(dataset(12), 400, seed=4):
        refs = [im.ref for im in r.images]
        assert len(set(refs)) == len(refs)
        assert refs.count(r.images[r.target_index].ref) == 1


def test_shared_image_is_never_its_own_distractor():
    samples = dataset(20, images=10)  # every image belongs to two samples
    recipes = make_recipes(
        samples, 400, seed=8, mix=AugmentMix(grid_counts={9: 1.0}, sequence_counts={5: 1.0})
    )
    for r in recipes:
        target = r.images[r.target_index]
        assert target.sample_id == r.sample_id
        assert all(im.ref != target.ref for i, im in enumerate(r.images) if i != r.target_index)
        assert len({im.ref for im in r.images}) == r.n_images


def test_distractors_come_from_the_targets_source():
    """As the official code: the other images of a prompt come from the target's subset (coco, gqa, ...)
    when it has enough; a subset too small for the prompt falls back to the whole dataset, and says so."""
    samples = [
        Sample(f"s{i}", ref(i), 640, 480, f"What is in picture {i}?", f"Answer {i}.", source="coco" if i < 4 else "gqa")
        for i in range(16)
    ]
    source = {s.image: s.source for s in samples}
    recipes = make_recipes(samples, num=300, seed=3)
    fell_back = 0
    for r in recipes:
        own = source[r.target.ref]
        others = [im for k, im in enumerate(r.images) if k != r.target_index]
        if r.same_source:
            assert all(source[im.ref] == own for im in others), r.uid
        else:  # only a coco target with more than 3 distractors cannot be served by coco
            assert own == "coco" and len(others) > 3, r.uid
            fell_back += 1
    assert 0 < fell_back < len(recipes)
    assert Recipe.from_dict(json.loads(json.dumps(recipes[0].to_dict()))) == recipes[0]


def test_grid_and_pic_in_pic_skip_samples_with_box_coordinates():
    assert has_box_coordinates("the man at [0.12, 0.34, 0.56, 0.78]") and has_box_coordinates("[0.5,0.25]")
    assert not has_box_coordinates("Image1 [left] has 3 cats.") and not has_box_coordinates("A red circle.")
    samples = dataset(12)
    boxed = {1, 4, 5, 9}
    samples = [
        Sample(s.id, s.image, s.width, s.height, "Where is [0.10, 0.20, 0.30, 0.40]?" if i in boxed else s.question, s.answer)
        for i, s in enumerate(samples)
    ]
    recipes = make_recipes(samples, num=240, seed=1)
    boxed_ids = {f"s{i}" for i in boxed}
    for r in recipes:
        if r.format in ("grid", "pic_in_pic"):
            assert r.sample_id not in boxed_ids
        else:
            assert r.skipped == 0
    assert any(r.skipped for r in recipes)  # some grid/pip recipe passed over a boxed sample
    assert any(r.format == "sequence" and r.sample_id in boxed_ids for r in recipes)  # sequences keep them
    # Deterministic, also in shards.
    assert make_recipes(samples, num=40, seed=1, start=100) == recipes[100:140]


def test_small_dataset_falls_back_to_a_smaller_count():
    samples = dataset(8, images=3)
    recipes = make_recipes(
        samples, 100, seed=1, mix=AugmentMix(grid_counts={9: 1.0}, sequence_counts={5: 1.0})
    )
    assert {(r.format, r.n_images) for r in recipes} == {("grid", 3), ("sequence", 3), ("pic_in_pic", 2)}


@pytest.mark.parametrize("samples", [[], dataset(3, images=1)])
def test_too_few_distinct_images_is_a_user_error(samples):
    with pytest.raises(UserError, match="distinct images|no samples"):
        make_recipes(samples, 5, seed=0)
    with pytest.raises(UserError):
        make_recipe(samples, 0, 0, AugmentMix())


# ---------------------------------------------------------------------------------------------- mix config


def test_default_mix_is_the_papers():
    mix = AugmentMix()
    assert mix.formats == {"sequence": 62, "grid": 90, "pic_in_pic": 49}
    assert mix.sequence_counts == {2: 55, 3: 16, 4: 16, 5: 13}
    assert mix.grid_counts == {2: 53, 3: 16, 4: 16, 6: 8, 9: 8}
    assert mix.only(["grid", "pic_in_pic"]).formats == {"grid": 90, "pic_in_pic": 49}
    assert mix.only(["grid"]).grid_counts == mix.grid_counts


def test_mix_round_trips_through_json():
    mix = AugmentMix(formats={"grid": 1}, grid_counts={4: 2, 9: 1})
    assert AugmentMix.from_dict(json.loads(json.dumps(mix.to_dict()))) == mix


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"formats": {"collage": 1.0}}, ("formats", "collage")),
        ({"formats": {"grid": -1.0}}, ("formats", "-1.0")),
        ({"formats": {"grid": 0.0, "sequence": 0}}, ("formats", "positive")),
        ({"formats": {"grid": float("nan")}}, ("formats", "nan")),
        ({"formats": {}}, ("formats",)),
        ({"grid_counts": {5: 1.0}}, ("grid_counts", "5")),
        ({"sequence_counts": {6: 1.0}}, ("sequence_counts", "6")),
        ({"sequence_counts": {2: "a lot"}}, ("sequence_counts", "a lot")),
        ({"grid_counts": [2, 3]}, ("grid_counts", "[2, 3]")),
    ],
)
def test_mix_validation_names_parameter_and_value(kwargs, words):
    with pytest.raises(ValueError) as info:
        AugmentMix(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_only_rejects_unknown_or_empty():
    with pytest.raises(ValueError, match="collage"):
        AugmentMix().only(["collage"])
    with pytest.raises(ValueError, match="formats"):
        AugmentMix().only([])
    with pytest.raises(ValueError, match="unknown"):
        AugmentMix.from_dict({"colours": {}})


def test_mix_fields_have_help():
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(AugmentMix))
