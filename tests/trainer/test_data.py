"""Loading a pair-set export for training."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset

from core.errors import UserError
from trainer.data import load_pairs
from workers.export import EXPORT_FEATURES


def test_loads_every_shard_as_is(pair_exports, tmp_path):
    export = pair_exports["tiny-llava"]
    assert len(list((export / "data").glob("*.parquet"))) == 2
    ds = load_pairs(export, cache_dir=tmp_path)
    assert len(ds) == 8 and set(EXPORT_FEATURES) == set(ds.column_names)
    row = ds[0]
    assert row["prompt"][0]["content"][0] == {"type": "text", "text": "Image 1: "}
    assert row["images"][0].size == (56, 56)


def test_no_shards_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no parquet shards") as info:
        load_pairs(tmp_path, cache_dir=tmp_path / "cache")
    assert info.value.code == "empty_pair_set"


def test_zero_rows_is_a_user_error(tmp_path):
    (tmp_path / "data").mkdir()
    empty = pa.Table.from_pylist([], schema=EXPORT_FEATURES.arrow_schema)
    pq.write_table(empty, tmp_path / "data" / "train-00000.parquet")
    with pytest.raises(UserError, match="no pairs"):
        load_pairs(tmp_path, cache_dir=tmp_path / "cache")


def test_not_the_preference_format_is_a_user_error(tmp_path):
    (tmp_path / "data").mkdir()
    Dataset.from_list([{"prompt": "hi", "answer": "yo"}]).to_parquet(str(tmp_path / "data" / "train-00000.parquet"))
    with pytest.raises(UserError, match="images, chosen, rejected"):
        load_pairs(tmp_path, cache_dir=tmp_path / "cache")


def test_unreadable_shard_is_a_user_error(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="not readable parquet") as info:
        load_pairs(tmp_path, cache_dir=tmp_path / "cache")
    assert info.value.code == "invalid_pair_set"
