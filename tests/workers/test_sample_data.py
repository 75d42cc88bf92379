"""The sample data is real: answers are checked against what the pixels show, not against the generator."""

import json
import re

import numpy as np
from PIL import Image

from workers.sample_data import COLORS, write_sample_data

WORDS = {"one": 1, "two": 2, "three": 3}


def _detect(img: Image.Image) -> list[tuple[str, str, str]]:
    """(slot, color, shape) for each shape found in the image, left to right."""
    arr = np.asarray(img.convert("RGB")).astype(int)
    h, w, _ = arr.shape
    found = []
    for slot, name in enumerate(("left", "middle", "right")):
        part = arr[:, slot * w // 3 : (slot + 1) * w // 3]
        best = None
        for color, rgb in COLORS.items():
            mask = np.abs(part - np.array(rgb)).sum(axis=2) < 60
            if mask.sum() > 400 and (best is None or mask.sum() > best[1].sum()):
                best = (color, mask)
        if best is None:
            continue
        color, mask = best
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
        found.append((name, color, shape))
    return found


def _answer(question: str, scene: list[tuple[str, str, str]]) -> str | None:
    q = question.replace("<image>\n", "")
    if q == "How many shapes are in the image?":
        return str(len(scene))
    if m := re.fullmatch(r"What color is the (\w+)\?", q):
        return next(c for _, c, s in scene if s == m[1])
    if m := re.fullmatch(r"What shape is (?:on the|in the) (\w+) of the image\?", q):
        return next(f"{c} {s}" for slot, c, s in scene if slot == m[1])
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", q):
        return str(sum(c == m[1] for _, c, _ in scene))
    if q.startswith("Which color is the leftmost"):
        return f"{scene[0][1]} {scene[-1][1]}"
    return None


def test_sample_answers_match_the_pixels(tmp_path):
    path = write_sample_data(tmp_path, num_samples=40, seed=3)
    rows = json.loads(path.read_text())
    assert len(rows) == 40
    checked = 0
    for row in rows:
        scene = _detect(Image.open(tmp_path / row["image"]))
        conv = row["conversations"]
        assert conv[0]["value"].startswith("<image>\n")
        for human, gpt in zip(conv[::2], conv[1::2], strict=True):
            expected = _answer(human["value"], scene)
            assert expected is not None, human["value"]
            answer = gpt["value"]
            for word, n in WORDS.items():
                answer = re.sub(rf"\b{word}\b", str(n), answer)
            for token in expected.split():
                assert re.search(rf"\b{token}\b", answer), (row["id"], human["value"], answer, scene)
            checked += 1
    assert checked >= 60


def test_sample_data_is_deterministic(tmp_path):
    a = write_sample_data(tmp_path / "a", num_samples=5, seed=1)
    b = write_sample_data(tmp_path / "b", num_samples=5, seed=1)
    assert a.read_text() == b.read_text()
    assert (tmp_path / "a/images/shapes_0003.jpg").read_bytes() == (tmp_path / "b/images/shapes_0003.jpg").read_bytes()


def test_single_style_answers_what_the_pixels_show(tmp_path):
    """`single` style (shapes-llava's data): one large shape, one-word colour and shape answers, both asked."""
    path = write_sample_data(tmp_path, num_samples=24, seed=5, style="single")
    rows = json.loads(path.read_text())
    first_kinds = set()
    for row in rows:
        img = Image.open(tmp_path / row["image"])
        assert img.size[0] == img.size[1]
        arr = np.asarray(img.convert("RGB")).astype(int)
        masks = {c: np.abs(arr - np.array(rgb)).sum(axis=2) < 60 for c, rgb in COLORS.items()}
        color = max(masks, key=lambda c: masks[c].sum())
        mask = masks[color]
        assert mask.sum() > 0.1 * mask.size  # one large shape
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
        conv = row["conversations"]
        answers = {h["value"].replace("<image>\n", ""): g["value"] for h, g in zip(conv[::2], conv[1::2], strict=True)}
        assert answers == {"What color is the shape?": color, "What shape is in the image?": shape}
        first_kinds.add(conv[0]["value"])
    assert len(first_kinds) == 2  # either question may come first (the one pairs and evaluations ask)
