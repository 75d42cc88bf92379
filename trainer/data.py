"""The pair-set export (DESIGN 2.6) as a `datasets.Dataset`, exactly as DPOTrainer takes it.

No conversion: the export already is TRL's vision preference format. The metadata columns stay; the
Trainer drops what the model does not take (`remove_unused_columns`, which keeps images/prompt/chosen/
rejected for vision data).
"""

from __future__ import annotations

from glob import glob
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, load_dataset

from core.errors import UserError

REQUIRED_COLUMNS = ("images", "prompt", "chosen", "rejected")


def shard_paths(export_dir: Path) -> list[str]:
    """The export's parquet shards (`data/*.parquet`), in name order."""
    return sorted(glob(str(Path(export_dir) / "data" / "*.parquet")))


def load_pairs(export_dir: Path, *, cache_dir: Path | None = None) -> Dataset:
    """Load a pair-set export for training.

    Args:
        export_dir: the export folder (parquet shards under `data/`).
        cache_dir: where `datasets` keeps its Arrow cache (default: its own, under HF_HOME).
    Returns:
        The rows, images decoded lazily by `datasets`.
    Raises:
        UserError: no shards, no rows, or not the preference format.
    """
    files = shard_paths(export_dir)
    if not files:
        raise UserError(f"pair set export {export_dir} has no parquet shards under data/", code="empty_pair_set")
    try:
        # Counted from the footers first: `datasets` cannot load a set of empty shards at all.
        num_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        if num_rows == 0:
            raise UserError(f"pair set export {export_dir} has no pairs to train on", code="empty_pair_set")
        dataset = load_dataset(
            "parquet", data_files=files, split="train", cache_dir=str(cache_dir) if cache_dir else None
        )
    except (pa.ArrowException, ValueError) as exc:
        raise UserError(f"pair set export {export_dir} is not readable parquet: {exc}", code="invalid_pair_set") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise UserError(
            f"pair set export {export_dir} lacks column(s) {', '.join(missing)} of the preference format",
            code="invalid_pair_set",
        )
    return dataset
