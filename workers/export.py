"""Pair-set export (DESIGN 2.6): parquet shards in TRL's vision preference format, and a dataset card.

Each row holds `images` (the rendered images, embedded as PNG bytes), `prompt` / `chosen` / `rejected`
as conversational messages with one `{"type": "image"}` part per image at the place the recipe's
prompt puts it, and metadata columns. `datasets.load_dataset("parquet", data_files=...)` decodes the
images and `trl.DPOTrainer` takes the rows as they are.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from core.store import atomic_writer

IMAGE_TOKEN = "<image>"
_PART = {"type": Value("string"), "text": Value("string")}
_MESSAGES = List({"role": Value("string"), "content": List(_PART)})
EXPORT_FEATURES = Features(
    {
        "images": List(Image()),
        "prompt": _MESSAGES,
        "chosen": _MESSAGES,
        "rejected": _MESSAGES,
        "uid": Value("string"),
        "source_id": Value("string"),
        "format": Value("string"),
        "n_images": Value("int32"),
        "target_index": Value("int32"),
        "attention_ratio": Value("float64"),
        "perplexity": Value("float64"),
        "length_ratio": Value("float64"),
        "edit_distance": Value("float64"),
    }
)


def prompt_messages(prompt: str) -> list[dict]:
    """The user turn: text parts and one `{"type": "image"}` part per `<image>`, in prompt order."""
    content: list[dict] = []
    for i, text in enumerate(prompt.split(IMAGE_TOKEN)):
        if i > 0:
            content.append({"type": "image", "text": None})
        if text:
            content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def answer_messages(text: str) -> list[dict]:
    """An assistant turn holding one text part."""
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


@dataclass
class ExportPair:
    """Everything one exported row needs."""

    uid: str
    source_id: str
    format: str
    target_index: int
    prompt: str
    images: Sequence[PILImage.Image]
    chosen: str
    rejected: str
    attention_ratio: float
    perplexity: float
    length_ratio: float
    edit_distance: float


def _png(img: PILImage.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # speed over size: pairs are downloaded once
    return buf.getvalue()


def export_row(pair: ExportPair) -> dict:
    """One parquet row; refuses a pair whose prompt and images disagree in count."""
    n_tokens = pair.prompt.count(IMAGE_TOKEN)
    if n_tokens != len(pair.images):
        raise ValueError(f"pair {pair.uid}: prompt has {n_tokens} image tokens but {len(pair.images)} images")
    return {
        "images": [{"bytes": _png(im), "path": None} for im in pair.images],
        "prompt": prompt_messages(pair.prompt),
        "chosen": answer_messages(pair.chosen),
        "rejected": answer_messages(pair.rejected),
        "uid": pair.uid,
        "source_id": pair.source_id,
        "format": pair.format,
        "n_images": len(pair.images),
        "target_index": pair.target_index,
        "attention_ratio": pair.attention_ratio,
        "perplexity": pair.perplexity,
        "length_ratio": pair.length_ratio,
        "edit_distance": pair.edit_distance,
    }


class ShardWriter:
    """Buffers rows and writes `data/train-NNNNN.parquet` shards atomically."""

    def __init__(self, out_dir: Path, rows_per_shard: int = 500) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.data_dir = Path(out_dir) / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.rows_per_shard = rows_per_shard
        self._rows: list[dict] = []
        self.paths: list[Path] = []
        self.num_rows = 0

    def add(self, pair: ExportPair) -> None:
        self._rows.append(export_row(pair))
        if len(self._rows) >= self.rows_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        dest = self.data_dir / f"train-{len(self.paths):05d}.parquet"
        table = Dataset.from_list(self._rows, features=EXPORT_FEATURES)
        with atomic_writer(dest) as fh:
            table.to_parquet(fh)
        self.paths.append(dest)
        self.num_rows += len(self._rows)
        self._rows = []

    def close(self) -> list[Path]:
        """Write what is buffered; return the shard paths."""
        self._flush()
        return self.paths


def histogram_png(values: Sequence[float], title: str, bins: int = 20, size: tuple[int, int] = (480, 260)) -> bytes:
    """A plain bar histogram drawn with PIL (no plotting library needed)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    w, h = size
    img = PILImage.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    draw.text((10, 6), f"{title} (n={len(finite)})", fill="black", font=font)
    left, top, right, bottom = 40, 30, w - 10, h - 30
    draw.line([(left, bottom), (right, bottom)], fill="black")
    if finite:
        lo, hi = min(finite), max(finite)
        span = hi - lo or 1.0
        counts = [0] * bins
        for v in finite:
            counts[min(int((v - lo) / span * bins), bins - 1)] += 1
        peak = max(counts)
        bar_w = (right - left) / bins
        for i, c in enumerate(counts):
            x0 = left + i * bar_w
            y0 = bottom - (bottom - top) * c / peak
            draw.rectangle([x0 + 1, y0, x0 + bar_w - 1, bottom], fill=(70, 110, 200))
        draw.text((left, bottom + 6), f"{lo:.3g}", fill="black", font=font)
        draw.text((right - 60, bottom + 6), f"{hi:.3g}", fill="black", font=font)
        draw.text((4, top), str(peak), fill="black", font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_card(
    out_dir: Path,
    *,
    title: str,
    counts: Mapping[str, object],
    per_format: Mapping[str, Mapping[int, int]],
    removed: Mapping[str, int],
    fences: Mapping[str, float],
    histograms: Mapping[str, Sequence[float]],
    config: Mapping[str, object],
    seed: int,
) -> Path:
    """Write README.md (the dataset card) and its histogram images into out_dir.

    Args:
        out_dir: export folder (the parquet shards are under data/).
        title: card heading.
        counts: pipeline counts (prompts, candidates, hallucinated, pairs before/after post-selection...).
        per_format: exported pairs by format, then by image count.
        removed: pairs removed by each post-selection filter.
        fences: the fitted post-selection bounds.
        histograms: name -> values; one PNG per entry under histograms/.
        config: the full pair-set configuration.
        seed: the pair set's seed.

    Returns:
        The card's path.
    """
    out_dir = Path(out_dir)
    (out_dir / "histograms").mkdir(parents=True, exist_ok=True)
    lines = [
        "---",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        "    path: data/train-*.parquet",
        "tags: [dpo, mia-dpo, multi-image, vision]",
        "---",
        f"# {title}",
        "",
        "Multi-image DPO preference pairs made with MIA-DPO (arXiv 2410.17637): chosen = the ground-truth answer,",
        "rejected = the model's own answer whose attention went to the wrong image. Rows follow TRL's vision",
        "preference format (`images`, conversational `prompt` / `chosen` / `rejected`).",
        "",
        "`candidates.jsonl` says why each prompt has a pair or not: every candidate answer with its attention",
        "ratio, perplexity and verdict (`kept`, `not_hallucinated`, `equals_ground_truth`, `empty`, ...), the",
        "threshold used, and the outcome (`exported`, `no_pair`, or the post-selection filter that removed it).",
        "",
        "## Counts",
        "",
        "| what | count |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in counts.items()],
        "",
        "## Pairs by format and image count",
        "",
        "| format | images | pairs |",
        "|---|---|---|",
        *[f"| {fmt} | {n} | {c} |" for fmt, by_n in sorted(per_format.items()) for n, c in sorted(by_n.items())],
        "",
        "## Post-selection (Tukey fences)",
        "",
        "| filter | removed |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in removed.items()],
        "",
        "Fitted bounds: " + ", ".join(f"{k} = {v:.4g}" for k, v in fences.items()),
        "",
        "## Histograms",
        "",
    ]
    for name, values in histograms.items():
        file = f"histograms/{name}.png"
        with atomic_writer(out_dir / file) as fh:
            fh.write(histogram_png(values, name))
        lines.append(f"![{name}]({file})")
    lines += ["", "## Configuration", "", f"Seed: {seed}", "", "```json", json.dumps(config, indent=2, default=str), "```", ""]
    card = out_dir / "README.md"
    with atomic_writer(card, "w") as fh:
        fh.write("\n".join(lines))
    return card
