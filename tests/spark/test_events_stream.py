"""The driver writes events.parquet from Spark's sorted parts in bounded batches (no Spark needed)."""

from __future__ import annotations

import polars as pl
import pyarrow.parquet as pq

from pantherseq.spark.prepare import TIME_US, stream_parts

COLUMNS = ["user_id", "timestamp", "amount", "label", "scenario", "gap_s", "split", "token", "user_idx"]


def _part(rows: range) -> pl.DataFrame:
    """A part as Spark writes it: times as epoch microseconds, counters as longs / ints."""
    n = len(rows)
    return pl.DataFrame({
        "user_id": [f"u{i // 3}" for i in rows], "amount": [float(i) for i in rows],
        "label": pl.Series([i % 2 for i in rows], dtype=pl.Int32), "scenario": pl.Series([0] * n, dtype=pl.Int32),
        "gap_s": [None if i % 3 == 0 else 60.0 for i in rows], "split": pl.Series([0] * n, dtype=pl.Int32),
        "token": pl.Series([2 + i for i in rows], dtype=pl.Int32), "user_idx": pl.Series([i // 3 for i in rows],
                                                                                       dtype=pl.Int64),
        TIME_US: pl.Series([1_700_000_000_000_000 + i * 60_000_000 for i in rows], dtype=pl.Int64)})


def test_parts_are_streamed_into_one_file_with_the_polars_schema(tmp_path):
    parts = []
    for k, rows in enumerate([range(7), range(7, 7), range(7, 12)]):  # the middle part is empty
        parts.append(tmp_path / f"part-{k:05d}.parquet")
        _part(rows).write_parquet(parts[-1])
    out = tmp_path / "events.parquet"
    stream_parts(parts, COLUMNS, out, batch_rows=2)
    got = pl.read_parquet(out)
    want = pl.concat([pl.read_parquet(p) for p in parts]).with_columns(
        pl.from_epoch(TIME_US, time_unit="us").alias("timestamp"), pl.col("user_idx").cast(pl.UInt32),
        pl.col("split").cast(pl.Int8), pl.col("label").cast(pl.Int8), pl.col("scenario").cast(pl.Int16)).select(COLUMNS)
    assert got.equals(want) and got.schema == want.schema
    assert pq.ParquetFile(out).metadata.num_row_groups == 7  # 7 + 0 + 5 rows in batches of at most 2: 4 + 3


def test_only_empty_parts_give_an_empty_file_with_the_schema(tmp_path):
    part = tmp_path / "part-00000.parquet"
    _part(range(0)).write_parquet(part)
    stream_parts([part], COLUMNS, tmp_path / "events.parquet")
    got = pl.read_parquet(tmp_path / "events.parquet")
    assert got.height == 0 and got.columns == COLUMNS and got.schema["user_idx"] == pl.UInt32
