"""Attention heat maps: a candidate's per-image-token attention drawn over the image it was about.

The shard records keep, per candidate, one fp16 value per image token (`workers.pipeline.encode_attention`)
and, per image, its token layout (`TokenLayout` as a dict plus `fit_offset`: where the rendered image sits
in the image the model was given, e.g. LLaVA's square padding). A token (r, c) covers the processed pixels
[c*cell_w, (c+1)*cell_w) x [r*cell_h, (r+1)*cell_h); the processor's map `processed = given * scale +
offset` takes them back to the given image, and `- fit_offset` to the rendered one. So the token grid is
one small image, stretched over that rectangle (bilinear between token centres) and coloured.

Values are stretched from the smallest to the largest of the candidate's image tokens (all images
together): in a sequence prompt the image the answer looked at stands out against the others, and a
near-uniform attention (a small model's) still shows where it leaned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

OUTLINE = (255, 40, 40)
# A perceptual dark-to-bright ramp (inferno's key colours): dark where attention is low, so the photo
# shows through; bright yellow where it is high.
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def image_values(attention: np.ndarray, layouts: Sequence[dict[str, Any]], index: int) -> np.ndarray:
    """Image `index`'s grid values (rows x cols, leading tokens dropped) from the concatenated attention."""
    sizes = [int(lay.get("leading_tokens", 0)) + int(lay["rows"]) * int(lay["cols"]) for lay in layouts]
    start = sum(sizes[:index])
    lay = layouts[index]
    values = np.asarray(attention[start : start + sizes[index]], dtype=np.float64)
    if values.shape[0] != sizes[index]:
        raise ValueError(f"attention has {attention.shape[0]} values, the layouts need {sum(sizes)}")
    return values[int(lay.get("leading_tokens", 0)) :].reshape(int(lay["rows"]), int(lay["cols"]))


def grid_scale(attention: np.ndarray, layouts: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """The smallest and largest grid values over all images (the colour scale)."""
    grids = [image_values(attention, layouts, k) for k in range(len(layouts))]
    values = np.concatenate([g.ravel() for g in grids] or [np.zeros(1)])
    if values.size == 0:
        return 0.0, 0.0
    return float(values.min()), float(values.max())


def colourise(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB floats."""
    return np.stack([np.interp(v, _STOPS, _COLOURS[:, ch]) for ch in range(3)], axis=-1)


def heatmap(
    image: Image.Image,
    grid: np.ndarray,
    layout: dict[str, Any],
    *,
    scale: tuple[float, float],
    box: Sequence[int] | None = None,
    alpha: float = 0.7,
) -> Image.Image:
    """`image` (the rendered image, RGB) with `grid` (rows x cols token values) drawn over it.

    Args:
        image: the rendered image the layout's tokens saw (before the model's padding).
        grid: the token values of this image.
        layout: its `TokenLayout` as a dict, with `fit_offset`.
        scale: the values drawn darkest and brightest (`grid_scale`).
        box: the target's region to outline (left, top, right, bottom), if any.
        alpha: opacity of the colour where attention is at its peak.
    """
    w, h = image.size
    rows, cols = grid.shape
    cw, ch = layout["cell"]
    sx, sy = layout["scale"]
    ox, oy = layout["offset"]
    fx, fy = layout.get("fit_offset") or (0, 0)
    # The token grid's rectangle in the rendered image's pixels.
    left, top = -ox / sx - fx, -oy / sy - fy
    width, height = cols * cw / sx, rows * ch / sy
    low, high = scale
    norm = np.clip((grid - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(grid)
    small = Image.fromarray(np.round(norm * 255).astype(np.uint8), mode="L")
    stretched = small.resize((max(1, round(width)), max(1, round(height))), Image.Resampling.BILINEAR)
    canvas = Image.new("L", (w, h), 0)
    canvas.paste(stretched, (round(left), round(top)))
    v = np.asarray(canvas, dtype=np.float64) / 255.0
    a = (0.15 + (alpha - 0.15) * v)[..., None]
    out = np.asarray(image.convert("RGB"), dtype=np.float64) * (1 - a) + colourise(v) * a
    result = Image.fromarray(np.round(out).astype(np.uint8), mode="RGB")
    if box is not None:
        outline(result, box)
    return result


def outline(image: Image.Image, box: Sequence[int] | None = None) -> Image.Image:
    """Draw the target's outline on `image` in place (the whole image when `box` is None); return it."""
    w, h = image.size
    left, top, right, bottom = box if box is not None else (0, 0, w, h)
    width = max(2, round(min(w, h) / 100))
    ImageDraw.Draw(image).rectangle((left, top, right - 1, bottom - 1), outline=OUTLINE, width=width)
    return image
