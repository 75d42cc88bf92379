"""Selection on a tiny LLaVA whose attention is steered, so the right verdicts are known (DESIGN 2.4).

A random tiny model attends arbitrarily, so the other tests can only check that the probe computes
attention correctly, not that selection picks the right candidates. Here the weights of tiny-llava
are set by hand so that layer 0 of the language model attends to the *red* patches of the images
(lowercase text) or to the *blue* ones (uppercase letters), and to nothing else:

- vision tower: every encoder layer is the identity (attention and MLP outputs zeroed, the residual
  passes through); the patch embedding computes, per 14 px patch, redness = mean(R - (G+B)/2) and
  blueness = mean(B - (R+G)/2) of the raw pixels (in [-1, 1]; the CLIP normalisation is undone in
  the weights) minus 0.5 (the position embedding supplies the constant), each written with both
  signs (+x, -x) so that pre_layrnorm, whose mean is then 0, keeps the sign of every feature;
- projector: the two features, times 1e4, pass GELU (negatives -> 0) onto language-model dims 0 (red)
  and 1 (blue), so a patch just over the threshold counts fully, one under it not at all;
- language model: every text token embeds to dim 2, uppercase letters to dim 3; in layer 0 every head
  maps dim 2 -> query dim 7 and dim 3 -> query dim 15, image dim 0 -> key dim 7 and dim 1 -> key
  dim 15. Dims 7 and 15 are the rotary pair of the lowest frequency and rope_theta is 1e9, so the
  position barely turns them: a query row's score is 36 on every patch of its colour and 0 on
  everything else (other patches, text), so all but ~e^-36 of its attention lands on its colour.

A candidate's ratio is then known: the probe averages the rows P-1 .. P+T-2 (the prompt's last
token ':' and the candidate's tokens but the last), so a lowercase candidate looks only at the red
image, and a candidate whose tokens are uppercase looks at the blue one on all rows but the first.

The verdicts come from the pipeline's own shard step (`workers.pipeline.process_recipes`: render, fit
the images for the model, probe, ratio, select) on hand-made recipes; only generation is scripted (a
backend that answers with the given texts, read through the model's own `AnswerReader`), since the
steered model's own answers are not the point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from workers.attention import probe
from workers.augment import PIP_PHRASES, Recipe, SourceImage, build_prompt
from workers.generate import Candidate, GenerationConfig, PromptInput
from workers.models import ModelHandle, TokenLayout, load_model, region_weights
from workers.pipeline import PipelineConfig, decode_attention, model_fit, process_recipes
from workers.render import render_recipe, target_box
from workers.select import EQUALS_GROUND_TRUTH, KEPT, NOT_HALLUCINATED, NOT_LOWEST, SelectionConfig

RED, BLUE = (255, 0, 0), (0, 0, 255)
SIZE = (640, 480)  # every source image's recorded size
QUESTION = "What is shown?"
TRUTH = "a red square"
LOWERCASE = [TRUTH, "a green circle"]  # the ground truth and a different answer, both looking at red
LAYER = 0
STEER = 1.5  # query and key weight: score = (8 * STEER) ** 2 / sqrt(16) = 36 on a matching patch
THRESHOLD = 0.5  # a patch is red (blue) when its mean redness (blueness) exceeds this
GAIN = 1e4  # projector gain before GELU
# The paper preset, with the layer that is steered and the rows the expected ratios below are worked out for.
CONFIG = PipelineConfig(layers=(LAYER,), selection=SelectionConfig(attention_rows="producing"), generation=GenerationConfig(batch_size=8))


# -- the steered model ------------------------------------------------------------------------------


@torch.no_grad()
def steer(handle: ModelHandle) -> None:
    """Set tiny-llava's weights as described in the module docstring (in place)."""
    model, processor = handle.model, handle.processor
    vision = model.model.vision_tower
    projector = model.model.multi_modal_projector
    lm = model.model.language_model
    text = model.config.text_config

    emb = vision.embeddings
    patch = emb.patch_embedding.weight  # (hidden, 3, 14, 14), no bias
    mean = torch.tensor(processor.image_processor.image_mean)
    std = torch.tensor(processor.image_processor.image_std)
    patch.zero_()
    emb.position_embedding.weight.zero_()
    emb.class_embedding.zero_()
    pixels = patch.shape[-1] * patch.shape[-2]
    # raw = normalised * std + mean: a detector sum_c coef_c * raw_c becomes weights coef_c * std_c
    # on the normalised pixels plus the constant sum_c coef_c * mean_c (added by the position table).
    for feature, coef in enumerate((torch.tensor([1.0, -0.5, -0.5]), torch.tensor([-0.5, -0.5, 1.0]))):
        offset = float((coef * mean).sum()) - THRESHOLD
        for channel, sign in ((feature, 1.0), (feature + 2, -1.0)):
            patch[channel] = (sign * coef * std / pixels)[:, None, None]
            emb.position_embedding.weight[:, channel] = sign * offset
    vision.pre_layrnorm.weight.fill_(1.0)
    vision.pre_layrnorm.bias.zero_()
    for layer in vision.encoder.layers:
        for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
            linear.weight.zero_()
            linear.bias.zero_()

    for linear in (projector.linear_1, projector.linear_2):
        linear.weight.zero_()
        linear.bias.zero_()
    for dim in (0, 1):
        projector.linear_1.weight[dim, dim] = GAIN
        projector.linear_2.weight[dim, dim] = 1.0

    tokenizer = processor.tokenizer
    embed = lm.embed_tokens.weight
    embed.zero_()
    embed[:, 2] = 1.0
    upper = tokenizer.convert_tokens_to_ids(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    embed[upper, 2] = 0.0
    embed[upper, 3] = 1.0
    attn = lm.layers[LAYER].self_attn
    head_dim = text.head_dim
    pair = head_dim // 2 - 1  # rotate_half pairs dims (i, i + head_dim/2); i = head_dim/2 - 1 turns slowest
    attn.q_proj.weight.zero_()
    attn.k_proj.weight.zero_()
    for head in range(text.num_attention_heads):
        red, blue = head * head_dim + pair, head * head_dim + pair + head_dim // 2
        attn.q_proj.weight[red, 2] = attn.q_proj.weight[blue, 3] = STEER
    for head in range(text.num_key_value_heads):
        red, blue = head * head_dim + pair, head * head_dim + pair + head_dim // 2
        attn.k_proj.weight[red, 0] = attn.k_proj.weight[blue, 1] = STEER
    lm.layers[LAYER].input_layernorm.weight.fill_(1.0)
    text.rope_parameters = {**text.rope_parameters, "rope_theta": 1e9}


@pytest.fixture(scope="module")
def steered(tiny_model_settings, tmp_path_factory) -> ModelHandle:
    """A steered copy of tiny-llava, saved and loaded back through `load_model` (rope_theta applies)."""
    handle = load_model("tiny-llava", tiny_model_settings)  # a fresh copy: the shared fixture stays as is
    steer(handle)
    path = tmp_path_factory.mktemp("models") / "steered-llava"  # an operator's model folder (MIADPO_MODELS_DIR)
    handle.model.save_pretrained(path)
    handle.processor.save_pretrained(path)
    return load_model(path.name, tiny_model_settings.model_copy(update={"models_dir": path.parent}))


# -- recipes and the selection as the pipeline runs it ----------------------------------------------


def solid(color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", SIZE, color)


def recipe(
    fmt: str, images: Sequence[Image.Image], target_index: int
) -> tuple[Recipe, dict[str, Image.Image]]:
    """A recipe over `images` (sequence/grid: display order; pic_in_pic: background, inset) and its loader table."""
    refs = {f"img{i}": im for i, im in enumerate(images)}
    sources = tuple(
        SourceImage(ref, im.width, im.height, f"s{i}") for i, (ref, im) in enumerate(refs.items())
    )
    phrase = PIP_PHRASES[0] if fmt == "pic_in_pic" else None
    return (
        Recipe(
            uid=f"steer-{fmt}",
            index=0,
            seed=0,
            format=fmt,
            sample_id=sources[target_index].sample_id,
            question=QUESTION,
            answer=TRUTH,
            images=sources,
            target_index=target_index,
            prompt=build_prompt(fmt, len(sources), target_index, QUESTION, phrase),
            phrase=phrase,
        ),
        refs,
    )


class ScriptedBackend:
    """Generation that answers every prompt with `texts`, each read as a backend reads what it decoded."""

    name = "scripted"

    def __init__(self, handle: ModelHandle, texts: Sequence[str]) -> None:
        self.reader, self.texts = handle.answer_reader(), list(texts)

    def generate(self, batch: Sequence[PromptInput], config: GenerationConfig) -> list[list[Candidate]]:
        return [[self.reader.from_text(t) for t in self.texts] for _ in batch]

    def close(self) -> None:
        pass


def judge(handle: ModelHandle, rec: Recipe, refs: dict[str, Image.Image], texts: Sequence[str]):
    """The pipeline's shard step on one recipe whose candidates are `texts`.

    Returns (the images as the model was given them, their fit offsets, the prompt's record, the ratios,
    the verdict reasons, the rejected index).
    """
    def load(ref: str) -> Image.Image:
        return refs[ref].copy()

    (record,) = process_recipes([rec], CONFIG, 0, handle=handle, backend=ScriptedBackend(handle, texts), load=load)
    assert [c["text"] for c in record["candidates"]] == list(texts)
    assert record["threshold"] == CONFIG.selection.threshold(rec.format, rec.n_images)
    images, offsets = model_fit(handle)(render_recipe(rec, load))
    ratios = [c["ratio"] for c in record["candidates"]]
    assert not any(r is None or math.isnan(r) for r in ratios)
    return images, offsets, record, ratios, [c["reason"] for c in record["candidates"]], record["rejected"]


def red_patches(handle: ModelHandle, image: Image.Image) -> np.ndarray:
    """Which of the image's 24 x 24 patches are red, from the processor's pixels alone (no model)."""
    ip = handle.processor.image_processor
    pixels = ip(images=[image], return_tensors="pt")["pixel_values"][0].double()  # (3, 336, 336)
    raw = (
        pixels * torch.tensor(ip.image_std).double()[:, None, None]
        + torch.tensor(ip.image_mean).double()[:, None, None]
    )
    redness = raw[0] - (raw[1] + raw[2]) / 2
    side = handle.processor.patch_size
    per_patch = redness.unfold(0, side, side).unfold(1, side, side).mean(dim=(-1, -2))  # (24, 24)
    return (per_patch > THRESHOLD).flatten().numpy()


def expected_region_ratio(handle: ModelHandle, rec: Recipe, image: Image.Image, offset: tuple[int, int], record: dict) -> float:
    """The region ratio if attention is spread evenly over the red patches and nowhere else.

    Each red token then counts with the fraction of its footprint inside the target box, moved as the
    image was fitted for the model (`region_weights`, the same map `recipe_ratio` uses); tokens
    straddling the box's edge are why a fully red cell scores below 1 and a red background around the
    inset above 0.
    """
    red = red_patches(handle, image)
    (layout_dict,) = record["layouts"]
    fields = {k: v for k, v in layout_dict.items() if k != "fit_offset"}
    layout = TokenLayout(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    assert layout.leading_tokens == 0 and red.shape == (layout.num_tokens,)
    assert tuple(layout_dict["fit_offset"]) == tuple(offset)
    # The attention (as recorded, float16) sits on exactly the red patches (token order = row-major
    # patch order), evenly: the lowercase candidate's rows all look at red.
    values = decode_attention(record["candidates"][0]["attention"])
    assert values[~red].sum() < 1e-6 * values.sum()
    assert values[red].max() / values[red].min() < 1 + 1e-2
    left, top, right, bottom = target_box(rec)
    dx, dy = offset
    return float(red @ region_weights(layout, (left + dx, top + dy, right + dx, bottom + dy)) / red.sum())


def distractors(noise_image, n: int) -> list[Image.Image]:
    return [noise_image(*SIZE, seed) for seed in range(n)]


# -- the tests --------------------------------------------------------------------------------------


def test_steering_puts_the_attention_on_the_red_patches(steered, noise_image):
    """The premise: lowercase rows put (almost) all their image attention on the red image's tokens."""
    images = [noise_image(*SIZE, 0), solid(RED), solid((255, 255, 255)), solid((0, 0, 0))]
    prompt = PromptInput("p", "".join(f"Image{i + 1}:<image>\n" for i in range(4)) + "Which?", images)
    (result,) = probe(
        steered,
        [prompt],
        [steered.processor.tokenizer("abc", add_special_tokens=False)["input_ids"]],
        layers=[LAYER],
    )
    per_image = [float(result.image(i, "producing").sum()) for i in range(4)]
    assert per_image[1] > 1 - 1e-9  # of all attention, image tokens and text alike
    assert sum(per_image) - per_image[1] < 1e-9
    # Evenly over the red image's tokens: the steering ignores the position (rope_theta 1e9).
    red = result.image(1, "producing")
    assert red.max() / red.min() < 1 + 1e-4


@pytest.mark.parametrize(
    ("n", "target", "red_at"),
    [(2, 0, 0), (2, 0, 1), (3, 2, 2), (3, 2, 0), (4, 1, 3), (5, 3, 0)],
)
def test_sequence_selection_follows_which_image_was_looked_at(steered, noise_image, n, target, red_at):
    images = distractors(noise_image, n)
    images[red_at] = solid(RED)
    rec, refs = recipe("sequence", images, target)
    *_, ratios, verdicts, rejected = judge(steered, rec, refs, LOWERCASE)
    if red_at == target:
        assert min(ratios) > 1 - 1e-9
        assert verdicts == [NOT_HALLUCINATED] * 2
        assert rejected is None
    else:
        assert max(ratios) < 1e-9
        assert verdicts == [EQUALS_GROUND_TRUTH, KEPT]
        assert rejected == 1


def test_candidates_of_one_prompt_get_their_own_verdicts(steered):
    """Uppercase tokens look at the blue distractor: each candidate's ratio is its share of red rows."""
    rec, refs = recipe("sequence", [solid(RED), solid(BLUE)], 0)
    texts = [TRUTH, "BLUE", "GREEN", TRUTH.upper(), "a blue square"]
    *_, ratios, verdicts, rejected = judge(steered, rec, refs, texts)
    # Rows P-1 .. P+T-2: the prompt's ':' and every candidate token but the last; red rows: ':' and the
    # lowercase tokens (the spaces of "A RED SQUARE" too): 12/12, 1/4, 1/5, 3/12, 13/13.
    expected = [1.0, 1 / 4, 1 / 5, 3 / 12, 1.0]
    np.testing.assert_allclose(ratios, expected, atol=1e-9)
    assert verdicts == [NOT_HALLUCINATED, NOT_LOWEST, KEPT, EQUALS_GROUND_TRUTH, NOT_HALLUCINATED]
    assert rejected == 2


@pytest.mark.parametrize(
    ("n", "target", "red_at"),
    [(2, 1, 1), (2, 1, 0), (3, 0, 0), (4, 2, 2), (4, 2, 1), (6, 5, 5), (9, 4, 4), (9, 4, 8)],
)
def test_grid_selection_follows_the_cell_that_was_looked_at(steered, noise_image, n, target, red_at):
    """One collage: the ratio maps the target cell to tokens through the processor's resize and crop."""
    images = distractors(noise_image, n)
    images[red_at] = solid(RED)
    rec, refs = recipe("grid", images, target)
    (collage,), (offset,), record, ratios, verdicts, rejected = judge(steered, rec, refs, LOWERCASE)
    np.testing.assert_allclose(ratios, expected_region_ratio(steered, rec, collage, offset, record), atol=1e-6)
    if red_at == target:
        assert min(ratios) > 0.85  # red tokens over the cell's edge weigh their share inside it
        assert verdicts == [NOT_HALLUCINATED] * 2
        assert rejected is None
    else:
        assert max(ratios) < 1e-9
        assert verdicts == [EQUALS_GROUND_TRUTH, KEPT]
        assert rejected == 1


@pytest.mark.parametrize("red_inset", [True, False])
def test_pic_in_pic_selection_follows_the_inset(steered, noise_image, red_inset):
    background, inset = noise_image(*SIZE, 0), solid(RED)
    if not red_inset:
        background, inset = solid(RED), noise_image(*SIZE, 1)
    rec, refs = recipe("pic_in_pic", [background, inset], 1)
    (canvas,), (offset,), record, ratios, verdicts, rejected = judge(steered, rec, refs, LOWERCASE)
    np.testing.assert_allclose(ratios, expected_region_ratio(steered, rec, canvas, offset, record), atol=1e-6)
    if red_inset:
        assert min(ratios) > 1 - 1e-9
        assert verdicts == [NOT_HALLUCINATED] * 2
        assert rejected is None
    else:
        assert max(ratios) < 0.15  # only red background tokens straddling the inset's edge count
        assert verdicts == [EQUALS_GROUND_TRUTH, KEPT]
        assert rejected == 1
