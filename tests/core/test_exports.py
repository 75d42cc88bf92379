"""Reading an export without the pipeline: pages across parquet files and row groups, one image, the archive."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

from PIL import Image

from core import exports
from workers.export import ExportPair, ShardWriter


def _export(folder: Path, n: int = 7, rows_per_shard: int = 3) -> list[str]:
    """n pairs over ceil(n / rows_per_shard) parquet files; pair i has i % 3 + 1 images of colour (i, k, 0)."""
    writer = ShardWriter(folder, rows_per_shard=rows_per_shard)
    uids = [f"5-{i:07d}" for i in range(n)]
    for i, uid in enumerate(uids):
        images = [Image.new("RGB", (8, 6), (i, k, 0)) for k in range(i % 3 + 1)]
        writer.add(
            ExportPair(
                uid=uid, source_id=f"s{i}", format="grid", target_index=0, prompt="Q:" + "<image>" * len(images) + " why?",
                images=images, chosen=f"yes {i}", rejected=f"no {i}", attention_ratio=0.1 * i,
                perplexity=math.nan if i == 2 else 2.0, length_ratio=1.0, edit_distance=0.5,
            )
        )  # fmt: skip
    assert len(writer.close()) == math.ceil(n / rows_per_shard)
    return uids


def test_pages_follow_the_row_order_across_files(tmp_path: Path) -> None:
    uids = _export(tmp_path)
    seen, after = [], None
    while True:
        rows, has_more = exports.preview_page(tmp_path, limit=2, after=after)
        seen.extend(rows)
        if not has_more:
            break
        after = rows[-1]["uid"]
    assert [r["uid"] for r in seen] == uids
    row = seen[4]
    assert row["prompt"] == "Q:<image><image> why?" and row["n_images"] == 2
    assert (row["chosen"], row["rejected"]) == ("yes 4", "no 4")
    assert seen[2]["perplexity"] is None  # NaN is not JSON
    assert "images" not in row
    assert exports.preview_page(tmp_path, limit=5, after=uids[-1]) == ([], False)
    assert [r["uid"] for r in exports.preview_page(tmp_path, limit=100, after="5-0000002x")[0]] == uids[3:]


def test_one_image_by_uid_and_position(tmp_path: Path) -> None:
    uids = _export(tmp_path)
    data = exports.pair_image(tmp_path, uids[5], 2)
    assert data is not None
    assert Image.open(io.BytesIO(data)).getpixel((0, 0)) == (5, 2, 0)
    assert exports.pair_image(tmp_path, uids[5], 3) is None
    assert exports.pair_image(tmp_path, "5-0000099", 0) is None


def test_the_archive_is_built_once_with_the_same_bytes(tmp_path: Path) -> None:
    _export(tmp_path / "export")
    (tmp_path / "export" / "README.md").write_text("card")
    first = exports.build_archive(tmp_path / "export", tmp_path / "a.tar.gz", root="ps_x").read_bytes()
    assert exports.build_archive(tmp_path / "export", tmp_path / "a.tar.gz", root="ps_x").read_bytes() == first
    again = exports.build_archive(tmp_path / "export", tmp_path / "b.tar.gz", root="ps_x").read_bytes()
    assert again == first  # no times or owners inside: the same files give the same archive
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        names = tar.getnames()
    assert names[0] == "ps_x/README.md" and "ps_x/data/train-00002.parquet" in names
