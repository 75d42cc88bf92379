from datasets import load_dataset
from PIL import Image

from workers.export import ExportPair, ShardWriter, prompt_messages, write_card


def _pair(i: int, n: int, fmt: str) -> ExportPair:
    prompt = "".join(f"Image{j + 1}:<image>\n" for j in range(n)) + "In Image1, what is it?" if fmt == "sequence" else "<image>\nIn Image1, what is it?"
    images = [Image.new("RGB", (32 + j, 24), (10 * j, 100, 200)) for j in range(n if fmt == "sequence" else 1)]
    return ExportPair(
        uid=f"u{i}", source_id=f"s{i}", format=fmt, target_index=0, prompt=prompt, images=images,
        chosen="A red cube.", rejected="A blue ball.", attention_ratio=0.2, perplexity=3.5, length_ratio=1.0, edit_distance=0.6,
    )


def test_prompt_messages_keep_image_positions():
    msgs = prompt_messages("Image1:<image>\nImage2:<image>\nIn Image2, what?")
    assert msgs == [{"role": "user", "content": [
        {"type": "text", "text": "Image1:"}, {"type": "image", "text": None},
        {"type": "text", "text": "\nImage2:"}, {"type": "image", "text": None},
        {"type": "text", "text": "\nIn Image2, what?"},
    ]}]
    assert [p["type"] for p in prompt_messages("<image>\nQ?")[0]["content"]] == ["image", "text"]


def test_shards_load_with_datasets_and_images_decode(tmp_path):
    writer = ShardWriter(tmp_path, rows_per_shard=3)
    pairs = [_pair(i, 2 + i % 3, "sequence" if i % 2 else "grid") for i in range(7)]
    for p in pairs:
        writer.add(p)
    paths = writer.close()
    assert len(paths) == 3 and writer.num_rows == 7
    ds = load_dataset("parquet", data_files=[str(p) for p in paths], split="train")
    assert len(ds) == 7
    for row, pair in zip(ds, pairs, strict=True):
        assert isinstance(row["images"][0], Image.Image)
        assert [im.size for im in row["images"]] == [im.size for im in pair.images]
        n_parts = sum(part["type"] == "image" for part in row["prompt"][0]["content"])
        assert n_parts == len(row["images"]) == row["n_images"]
        assert row["chosen"][0]["content"][0]["text"] == "A red cube."
        assert row["rejected"][0]["role"] == "assistant"
        assert row["uid"] == pair.uid and row["format"] == pair.format


def test_mismatched_pair_is_refused(tmp_path):
    bad = _pair(0, 2, "grid")
    bad.images = [*bad.images, bad.images[0]]
    try:
        ShardWriter(tmp_path).add(bad)
    except ValueError as exc:
        assert "2 images" in str(exc)
    else:
        raise AssertionError("a prompt/image count mismatch must be refused")


def test_card_lists_counts_and_histograms(tmp_path):
    card = write_card(
        tmp_path, title="t", counts={"prompts": 10, "pairs": 4}, per_format={"grid": {2: 3}, "sequence": {3: 1}},
        removed={"perplexity": 1, "length_ratio": 0, "edit_distance": 0}, fences={"perplexity_max": 9.5},
        histograms={"attention_ratio_grid": [0.1, 0.2, 0.5], "perplexity": []}, config={"seed": 3}, seed=3,
    )
    text = card.read_text()
    assert "| prompts | 10 |" in text and "| grid | 2 | 3 |" in text and "| perplexity | 1 |" in text
    assert "Seed: 3" in text and "histograms/attention_ratio_grid.png" in text
    assert Image.open(tmp_path / "histograms/attention_ratio_grid.png").size == (480, 260)
