"""Rendering: exact geometry of grids and pic-in-pic, pixels where they belong, byte-identical output."""

from __future__ import annotations

import dataclasses
import io
import pickle

import numpy as np
import pytest
from PIL import Image

from core.dataset import Sample
from core.store import ArtifactStore
from workers.augment import AugmentMix, Recipe, SourceImage, build_prompt, make_recipes
from workers.render import (
    CELL,
    GRID_SHAPES,
    LABEL_HEIGHT,
    MARGIN,
    encode_png,
    fit_size,
    grid_layout,
    image_boxes,
    label_image,
    open_image,
    perturb_target,
    pip_inset_box,
    render_recipe,
    store_loader,
    target_box,
)

WHITE = (255, 255, 255)
COLOURS = [(200, 30, 30), (30, 160, 40), (40, 60, 210), (230, 200, 20), (150, 40, 160), (20, 180, 190),
           (120, 80, 30), (250, 120, 150), (90, 90, 90)]  # fmt: skip


def png(size: tuple[int, int], colour: tuple[int, int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).convert(mode).save(buf, "PNG")
    return buf.getvalue()


def put(store: ArtifactStore, size: tuple[int, int], colour, sample_id: str = "s", **kw) -> SourceImage:
    return SourceImage(store.put_image_bytes(png(size, colour, **kw)), size[0], size[1], sample_id)


def recipe(fmt: str, images: list[SourceImage], target_index: int, phrase: str | None = None) -> Recipe:
    q = "<image>\nWhat colour is it?"
    return Recipe(
        uid="0-0000000", index=0, seed=0, format=fmt, sample_id=images[target_index].sample_id,
        question="What colour is it?", answer="Red.", images=tuple(images), target_index=target_index,
        prompt=build_prompt(fmt, len(images), target_index, q, phrase), phrase=phrase,
    )  # fmt: skip


def close(pixel, colour, tol: int = 3) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, colour, strict=True))


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


# ---------------------------------------------------------------------------------------------- geometry


def test_grid_layout_two():
    layout = grid_layout(2)
    assert (layout.rows, layout.cols, layout.size) == (1, 2, (1016, 576))
    assert layout.cells == ((40, 88, 488, 536), (528, 88, 976, 536))
    assert layout.labels == ((40, 76), (528, 76))


def test_grid_layout_nine():
    layout = grid_layout(9)
    assert (layout.rows, layout.cols, layout.size) == (3, 3, (1504, 1648))
    lefts, tops = (40, 528, 1016), (88, 624, 1160)
    assert layout.cells == tuple((x, y, x + 448, y + 448) for y in tops for x in lefts)
    assert layout.cells[5] == (1016, 624, 1464, 1072)


@pytest.mark.parametrize("n", sorted(GRID_SHAPES))
def test_grid_layout_every_size(n):
    layout = grid_layout(n)
    rows, cols = GRID_SHAPES[n]
    assert rows * cols == n == len(layout.cells) == len(layout.labels)
    assert layout.size == (
        cols * CELL + (cols + 1) * MARGIN,
        rows * (LABEL_HEIGHT + CELL) + (rows + 1) * MARGIN,
    )
    for i, ((left, top, right, bottom), (x, y)) in enumerate(zip(layout.cells, layout.labels, strict=True)):
        r, c = divmod(i, cols)  # row-major
        assert (right - left, bottom - top) == (CELL, CELL)
        assert (left, top) == (
            MARGIN + c * (CELL + MARGIN),
            MARGIN + r * (LABEL_HEIGHT + CELL + MARGIN) + LABEL_HEIGHT,
        )
        assert x == left and top - LABEL_HEIGHT < y < top  # label baseline inside the band above its cell
    assert layout.cells[-1][2] + MARGIN == layout.size[0]
    assert layout.cells[-1][3] + MARGIN == layout.size[1]


def test_grid_layout_rejects_other_counts():
    with pytest.raises(ValueError, match="5"):
        grid_layout(5)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((640, 480, 448, 448), (448, 336)),
        ((480, 640, 448, 448), (336, 448)),
        ((300, 600, 448, 336), (168, 336)),
        ((100, 50, 448, 448), (448, 224)),  # small images are enlarged
        ((448, 448, 448, 448), (448, 448)),
        ((1, 1000, 448, 448), (1, 448)),
        ((3, 2, 448, 448), (448, 299)),  # 298.67 rounds up
    ],
)
def test_fit_size(args, expected):
    assert fit_size(*args) == expected


def test_pip_inset_box_hand_checked():
    # 0.7 x 640x480 = 448x336; 300x600 fits as 168x336; centred: left (640-168)//2, top (480-336)//2.
    assert pip_inset_box((640, 480), (300, 600)) == (236, 72, 404, 408)
    assert pip_inset_box((640, 480), (640, 480)) == (96, 72, 544, 408)
    assert pip_inset_box((500, 375), (1000, 100)) == (75, 170, 425, 205)


def test_target_box_per_format(store):
    images = [put(store, (64, 48), c, f"s{i}") for i, c in enumerate(COLOURS[:4])]
    assert target_box(recipe("grid", images, 2)) == grid_layout(4).cells[2]
    assert target_box(recipe("sequence", images, 2)) is None
    bg, tg = SourceImage("a" * 64, 640, 480, "b"), SourceImage("c" * 64, 300, 600, "t")
    pip = recipe("pic_in_pic", [bg, tg], 1, "For the image in the center")
    assert target_box(pip) == (236, 72, 404, 408)
    assert image_boxes(pip) == ((0, 0, 640, 480), (236, 72, 404, 408))
    assert image_boxes(recipe("grid", images[:2], 0)) == ((40, 88, 488, 424), (528, 88, 976, 424))


# ---------------------------------------------------------------------------------------------- pixels


def test_grid_pixels(store):
    wide = put(store, (200, 100), COLOURS[0], "a")  # -> 448x224 at the cell's top-left
    tall = put(store, (90, 180), COLOURS[2], "b")  # -> 224x448
    (img,) = render_recipe(recipe("grid", [wide, tall], 1), store_loader(store))
    assert img.mode == "RGB" and img.size == (1016, 576)
    px = img.load()
    for x, y in [(40, 88), (487, 311), (260, 200)]:
        assert close(px[x, y], COLOURS[0]), (x, y)
    for x, y in [(528, 88), (751, 535), (600, 300)]:
        assert close(px[x, y], COLOURS[2]), (x, y)
    # White: below the wide image inside its cell, right of the tall one, margins, between cells.
    for x, y in [(40, 312), (487, 535), (752, 88), (975, 535), (5, 5), (39, 300), (508, 300), (1000, 560)]:
        assert px[x, y] == WHITE, (x, y)
    assert img.crop((0, 0, 1016, 40)).getextrema() == ((255, 255),) * 3  # nothing above the label bands
    for left in (40, 528):
        band = img.crop((left, 40, left + 448, 88)).convert("L")
        assert band.getextrema()[0] < 60  # dark label pixels in the band
        assert sum(1 for v in band.getdata() if v < 128) > 200
        assert img.crop((left + 200, 40, left + 448, 88)).getextrema() == ((255, 255),) * 3  # left-aligned


@pytest.mark.parametrize("n", sorted(GRID_SHAPES))
def test_every_grid_size_puts_each_image_in_its_cell(store, n):
    images = [put(store, (64, 48), COLOURS[i], f"s{i}") for i in range(n)]
    (img,) = render_recipe(recipe("grid", images, n - 1), store_loader(store))
    layout = grid_layout(n)
    assert img.size == layout.size
    for colour, (left, top, right, bottom), box in zip(
        COLOURS, layout.cells, image_boxes(recipe("grid", images, 0)), strict=False
    ):
        assert box == (left, top, left + 448, top + 336)
        assert img.crop(box).getextrema() == tuple((c, c) for c in colour)
        assert img.crop((left, top + 336, right, bottom)).getextrema() == ((255, 255),) * 3
        assert img.crop((left, top - LABEL_HEIGHT, left + 200, top)).convert("L").getextrema()[0] < 60


def test_pic_in_pic_pixels(store):
    bg = put(store, (640, 480), COLOURS[1], "bg")
    tg = put(store, (300, 600), COLOURS[0], "tg")
    (img,) = render_recipe(
        recipe("pic_in_pic", [bg, tg], 1, "For the image in the center"), store_loader(store)
    )
    assert img.size == (640, 480)
    px = img.load()
    for x, y in [(236, 72), (403, 407), (320, 240)]:
        assert close(px[x, y], COLOURS[0]), (x, y)
    for x, y in [(235, 72), (404, 72), (236, 71), (403, 408), (0, 0), (639, 479)]:
        assert close(px[x, y], COLOURS[1]), (x, y)


def test_sequence_returns_each_image(store):
    images = [
        put(store, (64 + 8 * i, 48), COLOURS[i], f"s{i}", mode="L" if i == 1 else "RGB") for i in range(3)
    ]
    out = render_recipe(recipe("sequence", images, 0), store_loader(store))
    assert [im.size for im in out] == [(64, 48), (72, 48), (80, 48)]
    assert all(im.mode == "RGB" for im in out)
    assert out[0].getpixel((5, 5)) == COLOURS[0]


def test_caching_loader_images_are_not_modified(store):
    bg = put(store, (320, 240), COLOURS[1], "bg")
    tg = put(store, (64, 64), COLOURS[0], "tg")
    cache = {im.ref: open_image(store.image_path(im.ref), (im.width, im.height)) for im in (bg, tg)}
    pip = recipe("pic_in_pic", [bg, tg], 1, "For the image in the center")
    first = encode_png(render_recipe(pip, cache.__getitem__)[0])
    assert cache[bg.ref].getextrema() == tuple((c, c) for c in COLOURS[1])
    assert encode_png(render_recipe(pip, cache.__getitem__)[0]) == first
    seq = render_recipe(recipe("sequence", [bg, tg], 0), cache.__getitem__)
    assert seq[0] is not cache[bg.ref]


def test_large_jpeg_is_draft_decoded(store, tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (1280, 960), COLOURS[3]).save(buf, "JPEG", quality=90)
    path = store.image_path(store.put_image_bytes(buf.getvalue()))
    assert open_image(path, (448, 336)).size == (640, 480)  # DCT-scaled at 1/2, never below the target
    assert open_image(path, (700, 336)).size == (1280, 960)
    src = SourceImage(path.name, 1280, 960, "big")
    other = put(store, (64, 48), COLOURS[0], "o")
    timings: dict[str, float] = {}
    (img,) = render_recipe(recipe("grid", [src, other], 0), store_loader(store), timings=timings)
    assert close(img.getpixel((200, 200)), COLOURS[3], tol=4)
    assert set(timings) == {"decode", "resize", "compose"}


def _jpeg_dataset(store: ArtifactStore, n: int) -> list[Sample]:
    samples = []
    for i in range(n):
        img = Image.linear_gradient("L").resize((160, 120)).convert("RGB")
        img.paste(COLOURS[i % len(COLOURS)], (10 * i % 100, 10, 10 * i % 100 + 40, 60))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        samples.append(
            Sample(f"s{i}", store.put_image_bytes(buf.getvalue()), 160, 120, "What is it?", "A box.")
        )
    return samples


def test_rendering_is_byte_identical(store):
    samples = _jpeg_dataset(store, 12)
    recipes = make_recipes(samples, 12, seed=3, mix=AugmentMix(grid_counts={9: 1, 2: 1}))
    assert {r.format for r in recipes} == {"sequence", "grid", "pic_in_pic"}

    def render_all() -> list[bytes]:
        load = store_loader(ArtifactStore(store.root))
        return [encode_png(im) for r in recipes for im in render_recipe(r, load)]

    first = render_all()
    assert render_all() == first
    load = pickle.loads(pickle.dumps(store_loader(store)))  # shards get the loader by pickling
    assert [encode_png(im) for r in recipes for im in render_recipe(r, load)] == first
    other = make_recipes(samples, 12, seed=4, mix=AugmentMix(grid_counts={9: 1, 2: 1}))
    load = store_loader(store)
    assert [encode_png(im) for r in other for im in render_recipe(r, load)] != first


@pytest.mark.parametrize("size", [(1, 1), (7, 1), (1, 5), (256, 3), (33, 17)])
def test_encode_png_round_trips(size):
    img = Image.effect_noise(size, 60).convert("RGB")
    img.paste((250, 10, 10), (0, 0, max(1, size[0] // 2), max(1, size[1] // 2)))
    data = encode_png(img)
    assert data == encode_png(img.copy()) and data.startswith(b"\x89PNG")
    Image.open(io.BytesIO(data)).verify()  # chunk CRCs
    back = Image.open(io.BytesIO(data))
    assert (back.mode, back.size, back.tobytes()) == ("RGB", size, img.tobytes())


def test_encode_png_other_modes_go_through_pillow():
    img = Image.linear_gradient("L")
    assert Image.open(io.BytesIO(encode_png(img))).tobytes() == img.tobytes()


def test_label_glyphs_are_cached():
    assert label_image(3) is label_image(3)
    mask, (dx, dy) = label_image(9)
    assert mask.mode == "L" and dy < 0 < mask.height and mask.width > 100


# ---------------------------------------------------------------------------------------------- noise


def _noise_cases(store: ArtifactStore) -> list[tuple[Recipe, int, tuple[int, int, int, int]]]:
    """(recipe, index of the perturbed image, its perturbed box) for each format."""
    images = [put(store, (64 + 16 * i, 48), COLOURS[i], f"s{i}") for i in range(4)]
    grid = recipe("grid", images, 2)
    bg, tg = put(store, (320, 240), COLOURS[5], "bg"), put(store, (60, 90), COLOURS[6], "tg")
    pip = recipe("pic_in_pic", [bg, tg], 1, "For the image in the center")
    seq = recipe("sequence", images[:3], 1)
    return [
        (grid, 0, image_boxes(grid)[2]),  # the pasted image, not the white rest of its cell
        (pip, 0, pip_inset_box((320, 240), (60, 90))),
        (seq, 1, (0, 0, 80, 48)),
    ]


def _changed(a: Image.Image, b: Image.Image) -> np.ndarray:
    """Mask of the pixels (rows, cols) that differ between two same-size images."""
    return (np.asarray(a) != np.asarray(b)).any(axis=2)


def test_noise_lands_on_the_target_region_only(store):
    load = store_loader(store)
    for rec, index, (left, top, right, bottom) in _noise_cases(store):
        clean = render_recipe(rec, load)
        before = [encode_png(im) for im in clean]
        noisy = perturb_target(clean, rec, 40.0, seed=7)
        assert [encode_png(im) for im in clean] == before  # the inputs are not touched
        assert len(noisy) == len(clean) and all(n is not c for n, c in zip(noisy, clean, strict=True))
        for i, (n, c) in enumerate(zip(noisy, clean, strict=True)):
            assert n.size == c.size and n.mode == "RGB"
            changed = _changed(n, c)
            if i != index:
                assert not changed.any(), (rec.format, i)
                continue
            inside = np.zeros_like(changed)
            inside[top:bottom, left:right] = True
            assert not changed[~inside].any(), rec.format
            assert changed[inside].mean() > 0.9, rec.format  # std 40: nearly every pixel moves
            diff = np.asarray(n, dtype=float)[top:bottom, left:right] - np.asarray(c, dtype=float)[top:bottom, left:right]
            assert 30 < diff.std() < 45, rec.format  # clipping at 0/255 trims it a little


def test_noise_is_seeded_by_seed_and_uid(store):
    load = store_loader(store)
    for rec, _, _ in _noise_cases(store):
        clean = render_recipe(rec, load)
        first = [encode_png(im) for im in perturb_target(clean, rec, 25.0, seed=3)]
        # Same (seed, uid), a fresh render (as another worker would make it): the same bytes.
        assert [encode_png(im) for im in perturb_target(render_recipe(rec, load), rec, 25.0, seed=3)] == first
        assert [encode_png(im) for im in perturb_target(clean, rec, 25.0, seed=4)] != first
        other_uid = dataclasses.replace(rec, uid="0-0000001")
        assert [encode_png(im) for im in perturb_target(clean, other_uid, 25.0, seed=3)] != first


def test_zero_noise_gives_the_same_pixels_as_new_images(store):
    load = store_loader(store)
    for rec, _, _ in _noise_cases(store):
        clean = render_recipe(rec, load)
        out = perturb_target(clean, rec, 0.0, seed=1)
        assert [encode_png(im) for im in out] == [encode_png(im) for im in clean]
        assert all(o is not c for o, c in zip(out, clean, strict=True))


@pytest.mark.parametrize("std", [-1.0, 256.0, float("nan")])
def test_noise_std_out_of_range_is_refused(store, std):
    rec, _, _ = _noise_cases(store)[0]
    with pytest.raises(ValueError, match="std"):
        perturb_target(render_recipe(rec, store_loader(store)), rec, std, seed=0)
