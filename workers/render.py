"""Deterministic pixels for a recipe (DESIGN 2.2): the geometry, then the renderer.

Geometry is pure arithmetic on the image sizes recorded in the recipe, so the attention stage can map a
grid cell or the pic-in-pic inset to patches without decoding anything, and the renderer draws exactly
those boxes. Rendering uses a fixed resampling filter and no randomness: the same recipe gives the same
bytes (same Pillow and torch, same CPU architecture), wherever it is rendered (generation, attention
pass, export, training).
The one random thing, `perturb_target` (generation's optional noise), is seeded by the recipe's uid.

Where the time goes (bench/augment.py), per grid collage from 640x480 JPEGs: JPEG decode ~1.2 ms per
source and its resize into the 448 px cell ~0.9 ms (torch's uint8 antialiased bicubic kernel: Pillow's
filter, within 1 of Pillow's values, about 6x faster than `Image.resize`), then, when a sample is
written, PNG encoding, the largest share. Decoding is cut with `Image.draft` (libjpeg's DCT scaling,
1/2 .. 1/8) whenever the cell needs at most half the source's size; the white canvas with its labels is
drawn once per grid size and copied;
`encode_png` uses one cheap row filter instead of Pillow's per-row filter search.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import core
from core.store import ArtifactStore
from workers.augment import Recipe, SourceImage

Box = tuple[int, int, int, int]  # (left, top, right, bottom), pixel coordinates, right/bottom exclusive
Loader = Callable[[str], Image.Image]

CELL = 448  # grid cell side, pixels
MARGIN = 40  # around and between cells
LABEL_HEIGHT = 48  # band above each cell holding its label
LABEL_FONT_SIZE = 36
LABEL_BASELINE = 12  # label baseline sits this far above its cell (DejaVu 36 px descends 9 px)
# images -> (rows, cols), numbered row-major
GRID_SHAPES: dict[int, tuple[int, int]] = {2: (1, 2), 3: (1, 3), 4: (2, 2), 6: (2, 3), 9: (3, 3)}
PIP_SCALE = 0.7  # the inset fits this fraction of the background's width and height
RESAMPLE = Image.Resampling.BICUBIC
REDUCING_GAP = 2.0  # resize via Image.reduce first when shrinking by 2x or more
FONT_PATH = Path(core.__file__).parent / "assets" / "DejaVuSans.ttf"
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class GridLayout:
    """Where everything of an n-image grid collage goes; cells and labels in row-major order."""

    rows: int
    cols: int
    size: tuple[int, int]  # canvas (width, height)
    cells: tuple[Box, ...]  # CELL x CELL box of each image
    labels: tuple[tuple[int, int], ...]  # left-baseline anchor of each "Image{i}" label


@functools.cache
def grid_layout(n: int) -> GridLayout:
    """The layout of a grid collage of n images (n in GRID_SHAPES)."""
    if n not in GRID_SHAPES:
        raise ValueError(f"no grid layout for {n} images; allowed {tuple(GRID_SHAPES)}")
    rows, cols = GRID_SHAPES[n]
    width = cols * CELL + (cols + 1) * MARGIN
    height = rows * (LABEL_HEIGHT + CELL) + (rows + 1) * MARGIN
    cells: list[Box] = []
    labels: list[tuple[int, int]] = []
    for r in range(rows):
        for c in range(cols):
            left = MARGIN + c * (CELL + MARGIN)
            top = MARGIN + r * (LABEL_HEIGHT + CELL + MARGIN) + LABEL_HEIGHT
            cells.append((left, top, left + CELL, top + CELL))
            labels.append((left, top - LABEL_BASELINE))
    return GridLayout(rows=rows, cols=cols, size=(width, height), cells=tuple(cells), labels=tuple(labels))


def fit_size(w: int, h: int, box_w: int, box_h: int) -> tuple[int, int]:
    """The largest (width, height) with the aspect of w x h that fits box_w x box_h (each side >= 1)."""
    if min(w, h, box_w, box_h) < 1:
        raise ValueError(f"sizes must be positive, got {w}x{h} into {box_w}x{box_h}")
    # Integer arithmetic, rounding half up: no float drift between platforms.
    if w * box_h <= h * box_w:  # height is the binding side
        return max(1, min(box_w, (2 * w * box_h + h) // (2 * h))), box_h
    return box_w, max(1, min(box_h, (2 * h * box_w + w) // (2 * w)))


def pip_box_size(background: tuple[int, int], scale: float = PIP_SCALE) -> tuple[int, int]:
    """The box the inset must fit: `scale` x the background's width and height (rounded, >= 1)."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale={scale} must be in (0, 1]")
    return max(1, round(background[0] * scale)), max(1, round(background[1] * scale))


def pip_inset_box(background: tuple[int, int], target: tuple[int, int], scale: float = PIP_SCALE) -> Box:
    """Where the target goes on the background: aspect kept, fitting `scale` x its size, centred."""
    bw, bh = background
    w, h = fit_size(*target, *pip_box_size(background, scale))
    left, top = (bw - w) // 2, (bh - h) // 2
    return left, top, left + w, top + h


def target_box(recipe: Recipe) -> Box | None:
    """The target's region in the rendered single image (grid: its whole cell; pic_in_pic: the inset).

    None for sequence recipes, whose target is a separate image.
    """
    if recipe.format == "grid":
        return grid_layout(recipe.n_images).cells[recipe.target_index]
    if recipe.format == "pic_in_pic":
        bg, tg = recipe.images
        return pip_inset_box((bg.width, bg.height), (tg.width, tg.height))
    return None


def image_boxes(recipe: Recipe) -> tuple[Box, ...] | None:
    """The pixels each source image actually covers in the rendered single image (None for sequence).

    Grid: the pasted, aspect-kept image at its cell's top-left (not the white rest of the cell).
    Pic-in-pic: (the whole background, the inset); the background's box includes the inset.
    """
    if recipe.format == "grid":
        boxes = []
        for im, (left, top, _, _) in zip(recipe.images, grid_layout(recipe.n_images).cells, strict=True):
            w, h = fit_size(im.width, im.height, CELL, CELL)
            boxes.append((left, top, left + w, top + h))
        return tuple(boxes)
    if recipe.format == "pic_in_pic":
        bg = recipe.images[0]
        return (0, 0, bg.width, bg.height), target_box(recipe)  # type: ignore[return-value]
    return None


# ---------------------------------------------------------------------------------------------- pixels


def open_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> Image.Image:
    """Open a stored image; with `size`, decode it for (at least) that size, RGB.

    Without `size` the image comes back lazily (header read, pixels not decoded), which lets the
    renderer pick the JPEG draft scale itself once it knows the cell size. With `size`, a JPEG whose
    target is at most half its size decodes directly at 1/2, 1/4 or 1/8 scale (never below `size`).
    """
    im = Image.open(path)
    if size is None:
        return im
    im.draft("RGB", size)
    return _rgb(im)


@dataclass(frozen=True)
class StoreLoader:
    """ref -> lazily opened image from the store; picklable, so it can travel to worker processes."""

    store: ArtifactStore

    def __call__(self, ref: str) -> Image.Image:
        return open_image(self.store.image_path(ref))


def store_loader(store: ArtifactStore) -> Loader:
    """The loader every stage should hand to `render_recipe`, so that all render the same pixels."""
    return StoreLoader(store)


def _rgb(im: Image.Image) -> Image.Image:
    im.load()
    return im if im.mode == "RGB" else im.convert("RGB")


class _Clock:
    """Adds elapsed time per phase into a dict (the benchmark's decode / resize / compose split)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings
        self.t = time.perf_counter() if timings is not None else 0.0

    def lap(self, phase: str) -> None:
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[phase] = self.timings.get(phase, 0.0) + now - self.t
            self.t = now


def resize_exact(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Antialiased bicubic resize of an RGB image to exactly `size`.

    torch's uint8 antialiased kernel implements Pillow's bicubic filter with integer arithmetic: its
    output is within 1 of `Image.resize(BICUBIC)` and about 6x faster, which is what makes grid
    collages cheap. It is deterministic on a given CPU architecture; a deployment whose workers mix
    architectures may see 1-value differences between renders of the same recipe.
    """
    if im.mode != "RGB" or min(im.size) < 2 or min(size) < 2:
        return im.resize(size, RESAMPLE, reducing_gap=REDUCING_GAP)  # torch's AA kernel wants >= 2 px
    src = torch.from_numpy(np.array(im)).permute(2, 0, 1).unsqueeze(0)  # a writable copy for torch
    planes = torch.nn.functional.interpolate(src, size=(size[1], size[0]), mode="bicubic", antialias=True)[0].numpy()
    # The kernel returns planar channels; Pillow merges planes faster than numpy interleaves them.
    return Image.merge("RGB", [Image.frombuffer("L", size, plane, "raw", "L", 0, 1) for plane in planes])


def _fitted(load: Loader, ref: str, size: tuple[int, int], clock: _Clock, own: bool = False) -> Image.Image:
    """Decode `ref` for `size` (JPEG draft when it helps) and resize it to exactly `size`.

    With `own`, the result is never the loader's object itself (a caching loader must not see it change).
    """
    src = load(ref)
    src.draft("RGB", size)  # no-op unless a JPEG not decoded yet
    im = _rgb(src)
    clock.lap("decode")
    if im.size != size:
        im = resize_exact(im, size)
    elif own and im is src:
        im = im.copy()
    clock.lap("resize")
    return im


@functools.lru_cache(maxsize=1)
def label_font() -> ImageFont.FreeTypeFont:
    """The bundled DejaVu Sans at LABEL_FONT_SIZE, loaded once per process."""
    return ImageFont.truetype(str(FONT_PATH), LABEL_FONT_SIZE)


@functools.cache
def label_image(i: int) -> tuple[Image.Image, tuple[int, int]]:
    """The glyph coverage of "Image{i}" as an L mask, and its offset from the left-baseline anchor."""
    text = f"Image{i}"
    left, top, right, bottom = (int(v) for v in label_font().getbbox(text, anchor="ls"))
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=label_font(), anchor="ls")
    return mask, (left, top)


@functools.cache
def _grid_canvas(n: int) -> Image.Image:
    """White canvas with every label drawn; copied for each collage, never modified."""
    layout = grid_layout(n)
    canvas = Image.new("RGB", layout.size, WHITE)
    for i, (x, y) in enumerate(layout.labels, start=1):
        mask, (dx, dy) = label_image(i)
        canvas.paste(BLACK, (x + dx, y + dy, x + dx + mask.width, y + dy + mask.height), mask)
    return canvas


def render_image(image: SourceImage, load: Loader) -> Image.Image:
    """One source image alone, RGB, at its recorded size (as a sequence recipe renders each of its images)."""
    return _fitted(load, image.ref, (image.width, image.height), _Clock(None), own=True)


def render_recipe(
    recipe: Recipe, load: Loader, *, timings: dict[str, float] | None = None
) -> list[Image.Image]:
    """The images the model sees for this recipe, RGB.

    Args:
        recipe: what to draw.
        load: ref -> PIL image; pass `store_loader(store)` (lazy JPEGs let the renderer draft-decode).
        timings: if given, seconds spent are added under "decode", "resize" and "compose".

    Returns:
        sequence: the N source images, at their recorded sizes; grid and pic_in_pic: [one image].
    """
    clock = _Clock(timings)
    if recipe.format == "sequence":
        return [_fitted(load, im.ref, (im.width, im.height), clock, own=True) for im in recipe.images]
    if recipe.format == "grid":
        layout = grid_layout(recipe.n_images)
        parts = [
            _fitted(load, im.ref, fit_size(im.width, im.height, CELL, CELL), clock) for im in recipe.images
        ]
        canvas = _grid_canvas(recipe.n_images).copy()
        for part, (left, top, _, _) in zip(parts, layout.cells, strict=True):
            canvas.paste(part, (left, top))
        clock.lap("compose")
        return [canvas]
    if recipe.format == "pic_in_pic":
        bg, tg = recipe.images
        box = pip_inset_box((bg.width, bg.height), (tg.width, tg.height))
        canvas = _fitted(load, bg.ref, (bg.width, bg.height), clock, own=True)
        inset = _fitted(load, tg.ref, (box[2] - box[0], box[3] - box[1]), clock)
        canvas.paste(inset, box[:2])
        clock.lap("compose")
        return [canvas]
    raise ValueError(f"unknown format {recipe.format!r}")


NOISE_REGIONS = ("target", "image")


def perturb_target(
    images: list[Image.Image], recipe: Recipe, std: float, seed: int, region: str = "target"
) -> list[Image.Image]:
    """The rendered images with seeded Gaussian noise on the target region or the whole image (DESIGN 2.3).

    Noise hides the target's details from the model, so that its answer leans on the other images: more
    hallucinated candidates to reject (the official code: grid, std 225 on the target cell; pic-in-pic,
    std 49 on the whole image).

    Args:
        images: `render_recipe(recipe, ...)`'s output; not modified.
        recipe: decides the region.
        std: standard deviation in pixel units (0..255); the result is rounded and clipped to 0..255.
        region: "target": grid -> the target's pasted image (not the white rest of its cell), pic_in_pic
            -> the inset, sequence -> the whole target image; "image": the whole image that holds the
            target (the collage, or the target image of a sequence).
        seed: combined with a stable hash of `recipe.uid`, so the same pair set gives the same bytes
            on any worker, in any shard or batch order.

    Returns:
        New RGB images, one per input image.
    """
    if not 0 <= std <= 255:  # also refuses nan
        raise ValueError(f"std must be in [0, 255], got {std}")
    if region not in NOISE_REGIONS:
        raise ValueError(f"region must be one of {NOISE_REGIONS}, got {region!r}")
    out = [_rgb(im.copy()) for im in images]
    if std == 0:
        return out
    if recipe.format == "sequence":
        index, box = recipe.target_index, (0, 0, *out[recipe.target_index].size)
    elif region == "image":
        index, box = 0, (0, 0, *out[0].size)
    else:
        boxes = image_boxes(recipe)
        assert boxes is not None
        index, box = 0, boxes[recipe.target_index]
    # SeedSequence takes non-negative ints: the seed's two's complement (64 bits) and the uid's crc32.
    rng = np.random.default_rng([seed & 0xFFFF_FFFF_FFFF_FFFF, zlib.crc32(recipe.uid.encode())])
    pixels = np.asarray(out[index].crop(box), dtype=np.float64)
    noisy = np.clip(np.rint(pixels + rng.normal(0.0, std, pixels.shape)), 0, 255).astype(np.uint8)
    out[index].paste(Image.fromarray(noisy), box[:2])
    return out


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(img: Image.Image) -> bytes:
    """PNG bytes of an RGB image, no metadata: the same pixels always give the same bytes.

    Every row uses the "Up" filter and zlib level 1 with run-length matching: about twice as fast as
    Pillow's encoder (which tries every filter per row) on photo collages, for files ~5 % larger.
    Other modes go through Pillow at compress_level 1.
    """
    if img.mode != "RGB":
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    width, height = img.size
    rows = np.asarray(img).reshape(height, width * 3)
    raw = np.empty((height, width * 3 + 1), dtype=np.uint8)
    raw[:, 0] = 2  # filter type Up: each byte minus the byte above (wrapping); the first row is as is
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    idat = deflate.compress(raw.data) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit truecolour, no interlace
    return PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
