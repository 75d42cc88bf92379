"""The prompt index (`core.prompts`) at the scale of a real pair set, and the heat map's geometry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from core import prompts
from workers.heatmap import grid_scale, heatmap, image_values

N = 100_000
FORMATS = ("sequence", "grid", "grid", "pic_in_pic")


def _record(i: int) -> dict:
    fmt = FORMATS[i % len(FORMATS)]
    n = 2 + i % 3 if fmt != "pic_in_pic" else 2
    return {
        "uid": f"5-{i:07d}",
        "recipe": {"format": fmt, "images": [{}] * n},
        "candidates": [{"hallucinated": i % 5 == 0}],
    }


def _outcome(i: int) -> str:
    return "exported" if i % 5 == 0 else "no_pair"


def test_a_page_of_100k_prompts_reads_only_its_own_records(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    per_shard = 25_000
    for s in range(N // per_shard):
        with open(shards / f"{s:05d}.jsonl", "w") as fh:
            for i in range(s * per_shard, (s + 1) * per_shard):
                fh.write(json.dumps(_record(i)) + "\n")
    writer = prompts.IndexWriter()
    paths = sorted(shards.glob("*.jsonl"))
    for shard, offset, length, rec in prompts.iter_records(paths):
        writer.add(shard, offset, length, rec, _outcome(int(rec["uid"].split("-")[1])))
    writer.write(tmp_path / "prompts.npy")
    index = prompts.load_index(tmp_path / "prompts.npy")
    assert len(index) == N and index.nbytes < 3_000_000

    # Grid prompts of 3 images that were exported, deep into the set, after a cursor.
    want = [i for i in range(N) if FORMATS[i % 4] == "grid" and 2 + i % 3 == 3 and _outcome(i) == "exported"]
    cursor = f"5-{want[1000]:07d}"
    filters = prompts.Filters(format="grid", n_images=3, outcome="exported")
    rows, has_more, total = prompts.page(index, filters, limit=20, after=cursor)
    expected = want[1001:1021]
    assert total == len(want) and has_more
    # Every other record is overwritten with garbage of the same length: a page that read them would fail.
    keep = {int(r["index"]) for r in rows}
    for s, path in enumerate(paths):
        lines = path.read_bytes().split(b"\n")
        out = [line if s * per_shard + k in keep else b"x" * len(line) for k, line in enumerate(lines)]
        path.write_bytes(b"\n".join(out))
    assert [prompts.read_record(shards, r)["uid"] for r in rows] == [f"5-{i:07d}" for i in expected]
    assert prompts.find(index, f"5-{expected[0]:07d}") is not None and prompts.find(index, "5-9999999") is None

    # No filter: positions straight from the cursor; the last page says so.
    rows, has_more, total = prompts.page(index, prompts.Filters(), limit=10, after=f"5-{N - 5:07d}")
    assert [int(r["index"]) for r in rows] == list(range(N - 4, N)) and not has_more and total == N
    counts = prompts.counts(index)
    assert counts["format"] == {"sequence": N // 4, "grid": N // 2, "pic_in_pic": N // 4}
    assert counts["outcome"] == {"exported": N // 5, "no_pair": N - N // 5}


def test_the_heat_map_puts_a_tokens_attention_where_that_token_looked() -> None:
    """A 200x100 image padded to 200x200 (fit offset 50 px down), resized to 336 px and cut into 24x24
    tokens of 14 px: all the attention on token (12, 6) lights up its footprint, x 50..58, y 50..58."""
    layout = {"rows": 24, "cols": 24, "cell": [14, 14], "scale": [1.68, 1.68], "offset": [0, 0], "leading_tokens": 1, "fit_offset": [0, 50]}
    attention = np.zeros(1 + 24 * 24)
    attention[0] = 5.0  # a CLS-like leading token: not drawn, and not part of the colour scale
    attention[1 + 12 * 24 + 6] = 1.0
    grid = image_values(attention, [layout], 0)
    assert grid.shape == (24, 24) and grid[12, 6] == 1.0
    image = Image.new("RGB", (200, 100), (128, 128, 128))
    drawn = heatmap(image, grid, layout, scale=grid_scale(attention, [layout]))
    assert drawn.size == image.size
    pixels = np.asarray(drawn, dtype=np.float64).sum(axis=2)
    y, x = np.unravel_index(np.argmax(pixels), pixels.shape)
    assert 48 <= x <= 60 and 48 <= y <= 60, (x, y)
    assert pixels[5, 150] < pixels[y, x] - 100  # far from the token: dark
