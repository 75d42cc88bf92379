"""A small synthetic single-image VQA dataset with true answers (coloured shapes), in LLaVA format.

Every image is drawn from a scene description, and every question is answered from that same
description, so the answers are correct by construction: this is real data for the demo and the
tests, not noise.

Two styles:
- `scenes` (default): 1-3 shapes in horizontal thirds, counting / colour / position questions, sentence answers.
- `single`: one large shape on a plain background, two questions ("What color is the shape?", "What shape
  is in the image?") answered with one word. What the built-in `shapes-llava` is trained on: a model small
  enough to train on a CPU learns it (the `scenes` style defeated a 0.87 M-parameter spike, DESIGN 6), every
  sample of a question kind asks the same text (so evaluation distractors always have a truth), and the
  shape is still several patches wide in a 3x3 grid collage.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SLOTS = ("left", "middle", "right")
SLOT_PHRASES = {"left": "on the left", "middle": "in the middle", "right": "on the right"}  # horizontal thirds; at most one shape per slot keeps positions unambiguous
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
WIDTH, HEIGHT = 384, 288
STYLES = ("scenes", "single")
SINGLE_SIDE = 256  # `single` style: square images (no padding to a square, the shape fills the model's view)
SINGLE_QUESTIONS = ("What color is the shape?", "What shape is in the image?")


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    slot: str
    cx: int
    cy: int
    radius: int


def _scene(rng: random.Random) -> tuple[tuple[int, int, int], list[Shape]]:
    """A background colour and 1-3 shapes, each in its own horizontal third."""
    background = tuple(rng.randint(225, 250) for _ in range(3))
    n = rng.randint(1, 3)
    slots = sorted(rng.sample(range(3), n))
    shapes = []
    for slot in slots:
        radius = rng.randint(26, 44)
        cx = slot * WIDTH // 3 + WIDTH // 6 + rng.randint(-12, 12)
        cy = rng.randint(radius + 10, HEIGHT - radius - 10)
        shapes.append(Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), SLOTS[slot], cx, cy, radius))
    return background, shapes  # type: ignore[return-value]


def _draw(background: tuple[int, int, int], shapes: list[Shape]) -> Image.Image:
    img = Image.new("RGB", (WIDTH, HEIGHT), background)
    _draw_shapes(img, shapes)
    return img


def _draw_shapes(img: Image.Image, shapes: list[Shape]) -> None:
    draw = ImageDraw.Draw(img)
    for s in shapes:
        box = (s.cx - s.radius, s.cy - s.radius, s.cx + s.radius, s.cy + s.radius)
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(s.cx, s.cy - s.radius), (s.cx - s.radius, s.cy + s.radius), (s.cx + s.radius, s.cy + s.radius)], fill=fill)


def _questions(shapes: list[Shape]) -> list[tuple[str, str]]:
    """Every question this scene answers unambiguously, with its true answer."""
    qa: list[tuple[str, str]] = []
    n = len(shapes)
    noun = "shape" if n == 1 else "shapes"
    verb = "is" if n == 1 else "are"
    qa.append(("How many shapes are in the image?", f"There {verb} {NUMBER_WORDS[n]} {noun} in the image."))
    for kind in SHAPES:
        same = [s for s in shapes if s.kind == kind]
        if len(same) == 1:
            qa.append((f"What color is the {kind}?", f"The {kind} is {same[0].color}."))
    for s in shapes:
        qa.append((f"What shape is {SLOT_PHRASES[s.slot]} of the image?", f"A {s.color} {s.kind}."))
    colors = {s.color for s in shapes}
    for color in sorted(colors):
        k = sum(s.color == color for s in shapes)
        qa.append((f"How many {color} shapes are there?", f"There {'is' if k == 1 else 'are'} {NUMBER_WORDS[k]} {color} {'shape' if k == 1 else 'shapes'}."))
    if n > 1:
        left, right = shapes[0], shapes[-1]
        qa.append(("Which color is the leftmost shape, and which is the rightmost?", f"The leftmost shape is {left.color} and the rightmost is {right.color}."))
    return qa


def _single_scene(rng: random.Random) -> tuple[tuple[int, int, int], Shape]:
    """A light plain background and one large shape (radius 26-38 % of the side) anywhere it fits whole."""
    background = tuple(rng.randint(225, 250) for _ in range(3))
    radius = rng.randint(SINGLE_SIDE * 26 // 100, SINGLE_SIDE * 38 // 100)
    cx = rng.randint(radius + 4, SINGLE_SIDE - radius - 4)
    cy = rng.randint(radius + 4, SINGLE_SIDE - radius - 4)
    return background, Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), "middle", cx, cy, radius)  # type: ignore[return-value]


def single_shape_questions(shape: Shape) -> list[tuple[str, str]]:
    """The `single` style's questions with their one-word answers."""
    return [(SINGLE_QUESTIONS[0], shape.color), (SINGLE_QUESTIONS[1], shape.kind)]


def write_sample_data(out_dir: Path, num_samples: int = 64, seed: int = 0, style: str = "scenes") -> Path:
    """Write `num_samples` LLaVA-format samples (JPEG images + llava.json) into out_dir.

    Args:
        out_dir: folder to create; holds `llava.json` and `images/`.
        num_samples: how many images (one sample each, two question turns when the scene has them).
        seed: the same seed gives the same files.
        style: `scenes` (1-3 shapes, sentence answers) or `single` (one large shape, one-word answers;
            which question comes first, i.e. the one pairs and evaluations use, is drawn per sample).

    Returns:
        The path of the JSON file.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_samples):
        name = f"images/shapes_{i:04d}.jpg"
        if style == "single":
            background, shape = _single_scene(rng)
            img = Image.new("RGB", (SINGLE_SIDE, SINGLE_SIDE), background)
            _draw_shapes(img, [shape])
            img.save(out_dir / name, format="JPEG", quality=90)
            picked = single_shape_questions(shape)
            rng.shuffle(picked)
        else:
            background, shapes = _scene(rng)
            _draw(background, shapes).save(out_dir / name, format="JPEG", quality=90)
            qa = _questions(shapes)
            picked = rng.sample(qa, min(2, len(qa)))
        conversations = []
        for turn, (q, a) in enumerate(picked):
            conversations.append({"from": "human", "value": f"<image>\n{q}" if turn == 0 else q})
            conversations.append({"from": "gpt", "value": a})
        rows.append({"id": f"shapes-{i:04d}", "image": name, "conversations": conversations})
    path = out_dir / "llava.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path
