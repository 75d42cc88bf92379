"""Pixel -> token mapping (DESIGN 2.4): hand-checked cases, and every grid size against the processors.

The collage geometry below is the renderer's (cells of 448 px, 40 px margins, a 48 px label band
above each cell), restated here so this test does not depend on workers/render.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil, Qwen2VLImageProcessorPil
from transformers.image_utils import PILImageResampling

from workers.models import TokenLayout, region_weights
from workers.models.llava import pixel_layout
from workers.models.qwen2_5_vl import FAMILY as QWEN

CELL, MARGIN, LABEL = 448, 40, 48
GRID_SHAPES = {2: (1, 2), 3: (1, 3), 4: (2, 2), 6: (2, 3), 9: (3, 3)}
NEAREST = PILImageResampling.NEAREST


def grid(n: int) -> tuple[tuple[int, int], list[tuple[int, int, int, int]]]:
    rows, cols = GRID_SHAPES[n]
    size = (cols * CELL + (cols + 1) * MARGIN, rows * (LABEL + CELL) + (rows + 1) * MARGIN)
    cells = []
    for r in range(rows):
        for c in range(cols):
            left, top = MARGIN + c * (CELL + MARGIN), MARGIN + r * (LABEL + CELL + MARGIN) + LABEL
            cells.append((left, top, left + CELL, top + CELL))
    return size, cells


def clip_processor(**kw) -> CLIPImageProcessorPil:
    """llava-hf/llava-1.5-7b-hf's image processor: shortest edge 336, centre crop 336."""
    return CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, **kw)


def pad_processor(**kw) -> LlavaImageProcessorPil:
    """LlavaImageProcessor with do_pad: pad to square (mean colour), then the same resize and crop."""
    return LlavaImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=True, **kw
    )


def qwen_processor(**kw) -> Qwen2VLImageProcessorPil:
    """The tiny Qwen2.5-VL image processor (4..64 tokens of 28x28 px)."""
    return Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64, **kw)


def qwen_layout(processor, image: Image.Image) -> TokenLayout:
    out = processor(images=[image], return_tensors="pt")
    return QWEN.token_layouts(SimpleNamespace(image_processor=processor), out, [image])[0]


# -- hand-checked cases ---------------------------------------------------------------------------


def test_square_image_left_half_is_exactly_half_the_patches():
    for side in (336, 1000):
        layout = pixel_layout(clip_processor(), (side, side), 14)
        assert layout.grid == (24, 24) and layout.num_tokens == 576
        weights = region_weights(layout, (0, 0, side / 2, side)).reshape(24, 24)
        assert weights.sum() == pytest.approx(288)
        assert np.allclose(weights[:, :12], 1) and np.allclose(weights[:, 12:], 0)
    layout = pixel_layout(clip_processor(), (336, 336), 14)
    # A box ending inside a patch: that patch counts with the fraction of it that is inside.
    weights = region_weights(layout, (0, 0, 21, 336)).reshape(24, 24)
    assert np.allclose(weights[:, 0], 1) and np.allclose(weights[:, 1], 0.5) and weights[:, 2:].sum() == 0


def test_grid_2_cell_2_through_llava_resize_and_centre_crop():
    size, cells = grid(2)
    assert size == (1016, 576) and cells[1] == (528, 88, 976, 536)
    layout = pixel_layout(clip_processor(), size, 14)
    # Shortest edge 576 -> 336, long edge int(336 * 1016 / 576) = 592, crop 336: 128 px cut each side.
    assert layout.scale == (592 / 1016, 336 / 576) and layout.offset == (-128, 0)
    w = region_weights(layout, cells[1]).reshape(24, 24)
    left = 528 * 592 / 1016 - 128  # 179.65: inside column 12 = [168, 182)
    top = 88 * 336 / 576  # 51.33: inside row 3 = [42, 56)
    bottom = 536 * 336 / 576  # 312.67: inside row 22 = [308, 322)
    # The right edge maps to 440.7, beyond the crop: the cell runs to the crop's right edge.
    col = np.r_[np.zeros(12), (182 - left) / 14, np.ones(11)]
    row = np.r_[np.zeros(3), (56 - top) / 14, np.ones(18), (bottom - 308) / 14, 0]
    assert np.allclose(w, np.outer(row, col))
    assert w[10, 20] == 1 and w[10, 11] == 0 and w[10, 12] == pytest.approx(0.1676, abs=1e-4)
    assert w[3, 15] == pytest.approx(1 / 3) and w[23].sum() == 0
    # Cell 1 is the mirror image: the crop is centred on a symmetric collage.
    assert np.allclose(region_weights(layout, cells[0]).reshape(24, 24), w[:, ::-1])


def test_grid_2_cell_2_through_llava_pad_to_square():
    size, cells = grid(2)
    layout = pixel_layout(pad_processor(), size, 14)
    s = 336 / 1016  # padded to 1016x1016 (220 px above and below), then resized to 336
    assert layout.scale == (s, s) and layout.offset == (0, pytest.approx(220 * s))
    w = region_weights(layout, cells[1]).reshape(24, 24)
    col = np.r_[np.zeros(12), (182 - 528 * s) / 14, np.ones(10), (976 * s - 322) / 14]
    row = np.r_[np.zeros(7), (112 - 308 * s) / 14, np.ones(9), (756 * s - 238) / 14, np.zeros(6)]
    assert np.allclose(w, np.outer(row, col))
    # The padding (rows 0-4 entirely) belongs to no region, even a box covering the whole image.
    full = region_weights(layout, (0, 0, *size)).reshape(24, 24)
    assert full[:5].sum() == 0 and full[19:].sum() == 0 and np.allclose(full[6:18], 1)


def test_pic_in_pic_centred_inset_qwen():
    background = Image.new("RGB", (1000, 800))
    inset = (150, 120, 850, 680)  # a 500x400 target fitted into 0.7 x 1000x800, centred
    layout = qwen_layout(qwen_processor(), background)
    # smart_resize(800, 1000, 28, max 50176 px) = 196 x 224: 7 x 8 tokens of 28 px, pure scaling.
    assert layout.grid == (7, 8) and layout.scale == (224 / 1000, 196 / 800) and layout.offset == (0, 0)
    w = region_weights(layout, inset).reshape(7, 8)
    col = np.array([0, 0.8, 1, 1, 1, 1, 0.8, 0])  # 33.6 .. 190.4 px
    row = np.array([0, 0.95, 1, 1, 1, 0.95, 0])  # 29.4 .. 166.6 px
    assert np.allclose(w, np.outer(row, col)) and w.sum() == pytest.approx(5.6 * 4.9)


def test_pic_in_pic_centred_inset_llava():
    layout = pixel_layout(clip_processor(), (1000, 1000), 14)
    w = region_weights(layout, (150, 150, 850, 850)).reshape(24, 24)
    edge = np.r_[np.zeros(3), 0.4, np.ones(16), 0.4, np.zeros(3)]  # 50.4 .. 285.6 px
    assert np.allclose(w, np.outer(edge, edge))


def test_boxes_are_clipped_and_leading_tokens_weigh_nothing():
    layout = TokenLayout(
        image_size=(28, 28),
        rows=2,
        cols=2,
        cell=(14.0, 14.0),
        scale=(1.0, 1.0),
        offset=(0.0, 0.0),
        leading_tokens=1,
    )
    assert region_weights(layout, (-50, -50, 14, 14)).tolist() == [0, 1, 0, 0, 0]
    assert region_weights(layout, (20, 20, 10, 10)).tolist() == [0] * 5  # empty box
    assert region_weights(layout, (0, 0, 1000, 1000)).tolist() == [0, 1, 1, 1, 1]


# -- every grid size and pic-in-pic, against what the processors actually do -------------------------


def label_image(size: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> Image.Image:
    """Black image, box i filled with grey level 20 * (i + 1) (none equals the pad colour's 104 in blue)."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    for i, (left, top, right, bottom) in enumerate(boxes):
        pixels[top:bottom, left:right] = 20 * (i + 1)
    return Image.fromarray(pixels)


def processed_levels(processor, image: Image.Image, patch: int) -> np.ndarray:
    """The blue channel of what the vision tower sees, back in 0..255 grey levels."""
    out = processor(images=[image], return_tensors="np")
    values = out["pixel_values"]
    if "image_grid_thw" in out:  # Qwen: undo the patchify into (tokens, C * T * p * p)
        _, gh, gw = (int(v) for v in out["image_grid_thw"][0])
        m = processor.merge_size
        blocks = values.reshape(gh // m, gw // m, m, m, 3, processor.temporal_patch_size, patch, patch)[
            :, :, :, :, :, 0
        ]
        values = blocks.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * patch, gw * patch)
    else:
        values = values[0]
    return np.rint((values[2] * processor.image_std[2] + processor.image_mean[2]) * 255)


def measured_fractions(levels: np.ndarray, level: int, layout: TokenLayout) -> np.ndarray:
    inside = (levels == level).astype(np.float64)
    ch, cw = int(layout.cell[1]), int(layout.cell[0])
    return inside.reshape(layout.rows, ch, layout.cols, cw).mean(axis=(1, 3)).ravel()


CASES = [
    ("llava-crop", lambda: clip_processor(resample=NEAREST)),
    ("llava-pad", lambda: pad_processor(resample=NEAREST)),
    ("qwen", lambda: qwen_processor(resample=NEAREST)),
]


@pytest.mark.parametrize("name,make", CASES, ids=[c[0] for c in CASES])
def test_every_grid_size_and_pic_in_pic_match_the_processor(name, make):
    processor = make()
    scenes = [grid(n) for n in GRID_SHAPES]
    scenes.append(((1000, 800), [(150, 120, 850, 680)]))  # pic-in-pic
    scenes.append(((640, 1100), [(96, 165, 544, 935)]))  # a tall one
    for size, boxes in scenes:
        image = label_image(size, boxes)
        if name == "qwen":
            layout, patch = qwen_layout(processor, image), 14
        else:
            layout, patch = pixel_layout(processor, size, 14), 14
        levels = processed_levels(processor, image, patch)
        assert levels.shape == (layout.rows * layout.cell[1], layout.cols * layout.cell[0])
        covered = np.zeros(layout.num_tokens)
        for i, box in enumerate(boxes):
            expected = region_weights(layout, box)
            got = measured_fractions(levels, 20 * (i + 1), layout)
            # Nearest-neighbour sampling moves an edge by less than a pixel: on a token of `cell`
            # pixels, at most 1/cell per side it touches; tokens away from the edges are exact.
            px = 1 / layout.cell[0]
            assert np.abs(expected - got).max() <= 2 * px + 1e-9, (name, size, i)
            edge = (np.minimum(expected, got) < 1) & (np.maximum(expected, got) > 0)
            assert np.array_equal(expected[~edge], got[~edge]), (name, size, i)
            assert abs(expected.sum() - got.sum()) <= px * edge.sum(), (name, size, i)
            covered += expected
        assert covered.max() <= 1 + 1e-9  # cells are disjoint


def test_llava_token_layouts_agree_with_the_tiny_processor(tiny_llava, noise_image):
    from workers.models.llava import FAMILY as LLAVA

    images = [noise_image(1016, 576), noise_image(200, 700, 1)]
    out = tiny_llava.processor(text=["<image><image>"], images=images, return_tensors="pt")
    layouts = LLAVA.token_layouts(tiny_llava.processor, out, images)
    assert [lay.grid for lay in layouts] == [(24, 24), (24, 24)] and layouts[0].leading_tokens == 0
    assert int((out["input_ids"] == tiny_llava.processor.image_token_id).sum()) == 2 * 576
    assert torch.is_tensor(out["pixel_values"])


def test_crop_larger_than_the_resized_image_pads_like_each_backend():
    from workers.models.llava import _crop_offset

    # PIL backend (numpy centre_crop): ceil of half the missing pixels before the image.
    processor = CLIPImageProcessorPil(
        size={"height": 301, "width": 336}, crop_size={"height": 336, "width": 336}, resample=NEAREST
    )
    layout = pixel_layout(processor, (336, 301), 14)
    assert layout.offset == (0, 18) and layout.scale == (1, 1)
    levels = processed_levels(processor, label_image((336, 301), [(0, 0, 336, 301)]), 14)
    assert (levels[:18] != 20).all() and (levels[18:319] == 20).all() and (levels[319:] != 20).all()
    # Torchvision backend: floor; cropping (image larger than the crop) is floor in both.
    assert _crop_offset(301, 336, pil=False) == 17 and _crop_offset(400, 336, pil=False) == -32
    assert _crop_offset(401, 336) == _crop_offset(401, 336, pil=False) == -32
