"""`prepare --engine spark` writes the same run directory as the Polars engine (tokens, codes, splits, counts,
tokenizer, events, users) and stops on bad input with the same one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import HANDBOOK_HEADER, handbook_rows, write_lines
from data.test_items import CONFIG as ITEMS_CONFIG
from data.test_items import ITEMS, _events
from pantherseq.data.schema import load_dataset_config
from pantherseq.data.sequences import Sequences, load_shards
from pantherseq.errors import ConfigError, DataError
from pantherseq.prepare import prepare

pytestmark = [pytest.mark.slow, pytest.mark.spark]

SPLIT = ['split.t1="2018-06-01"', 'split.t2="2018-08-01"']


def _config(data: Path, extra: list[str] = ()):
    return load_dataset_config("handbook", overrides=[*SPLIT, *extra], data=str(data))


def _two_files(tmp_path: Path) -> Path:
    """Two CSV parts (whole users each) plus a duplicate event id and a too-short user to drop."""
    rows = handbook_rows(n_users=9, per_user=25)
    folder = tmp_path / "in"
    folder.mkdir()
    write_lines(folder / "a.csv", [HANDBOOK_HEADER, *rows[:100], "9999,2018-05-02 10:00:00,77,3,12.50,0,0"])
    write_lines(folder / "b.csv", [HANDBOOK_HEADER, *rows[100:], rows[3], "9998,2018-05-03 10:00:00,78,3,x,0,0"])
    return folder


def assert_same_run(a: Path, b: Path, ignore: tuple[str, ...] = ()) -> None:
    ja, jb = (json.loads((p / "prepare.json").read_text()) for p in (a, b))
    skip = ("wall_s", *ignore)
    assert {k: v for k, v in ja.items() if k not in skip} == {k: v for k, v in jb.items() if k not in skip}
    assert json.loads((a / "tokenizer.json").read_text()) == json.loads((b / "tokenizer.json").read_text())
    sa, sb = Sequences.load(a / "sequences"), Sequences.load(b / "sequences")
    for name in ("offsets", "tokens", "codes", "time", "gap", "label", "scenario", "split"):
        x, y = getattr(sa, name), getattr(sb, name)
        assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=name == "gap"), name
    for name in ("events.parquet", "users.parquet"):
        assert pl.read_parquet(a / name).equals(pl.read_parquet(b / name)), name


@pytest.mark.parametrize("extra", [["bad_rows=\"drop\"", "split.min_events=3", "sequences.shards=3"],
                                   ["bad_rows=\"drop\"", "split.kind=\"leave_last_out\""]])
def test_spark_and_polars_write_the_same_run(spark, tmp_path, extra):
    data = _two_files(tmp_path)
    polars = prepare(_config(data, extra), tmp_path / "polars")
    prepare(_config(data, extra), tmp_path / "spark", engine="spark")
    assert_same_run(tmp_path / "polars", tmp_path / "spark")
    assert polars["rows_dropped"]["duplicate_event_id"] == 1 and "not_a_number:TX_AMOUNT" in polars["rows_dropped"]
    shards = 3 if "sequences.shards=3" in extra else 1
    assert len(load_shards(tmp_path / "spark" / "sequences")) == shards


def test_spark_reuses_another_runs_tokenizer_as_polars_does(spark, tmp_path):
    """--tokenizer-from: both engines encode with the other run's tokenizer as it is (nothing fitted, its file
    copied byte for byte), so they write the same run, and it is not the run a fit of their own would give."""
    data = _two_files(tmp_path)
    first = tmp_path / "first"
    prepare(_config(data, ['bad_rows="drop"', 'split.t1="2018-04-20"', "tokenizer.top_k=20"]), first)
    for engine in ("polars", "spark"):
        prepare(_config(data, ['bad_rows="drop"']), tmp_path / engine, engine=engine, tokenizer_from=first)
    assert_same_run(tmp_path / "polars", tmp_path / "spark")
    assert (tmp_path / "spark" / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    own = prepare(_config(data, ['bad_rows="drop"']), tmp_path / "own", engine="spark")
    assert own["vocab_size"] != json.loads((tmp_path / "spark" / "prepare.json").read_text())["vocab_size"]


@pytest.mark.parametrize("complement", [False, True])
def test_spark_joins_the_item_table_and_draws_the_users_as_polars_does(spark, tmp_path, complement):
    """[items] (fields from a side table; an item it lacks -> missing fields) and [users] (a seeded part of the
    users, or the rest): the same run from both engines, items.parquet included."""
    config = tmp_path / "c.toml"
    config.write_text(ITEMS_CONFIG.format(items=write_lines(tmp_path / "items.csv", ITEMS)))
    data = _events(tmp_path / "events.csv", n_users=10)
    part = ["users.fraction=0.6", "users.seed=3", f"users.complement={str(complement).lower()}"]
    for engine in ("polars", "spark"):
        prepare(load_dataset_config("csv", config, overrides=part, data=str(data)), tmp_path / engine, engine=engine)
    assert_same_run(tmp_path / "polars", tmp_path / "spark")
    report = json.loads((tmp_path / "spark" / "prepare.json").read_text())
    kept = 4 if complement else 6
    assert report["users"] == kept and report["rows_dropped"]["user_not_chosen"] == (10 - kept) * 6
    assert report["items"]["items"] == 3 and report["items"]["events_unmatched"] > 0  # item d
    assert pl.read_parquet(tmp_path / "polars" / "items.parquet").equals(pl.read_parquet(tmp_path / "spark" / "items.parquet"))
    assert set(pl.read_parquet(tmp_path / "spark" / "events.parquet")["brand"].unique().to_list()) == {"acme", "bolt", None}


@pytest.mark.parametrize("bad", [
    "9998,2018-05-03 10:00:00,78,3,x,0,0",            # not a number
    "9998,2018-13-03 10:00:00,78,3,1.0,0,0",          # unparsable time
    "9998,2018-05-03 10:00:00,,3,1.0,0,0",            # an empty user id
    "5,2018-05-03 10:00:00,78,3,1.0,0,0",             # a duplicate event id
])
def test_spark_stops_on_bad_input_with_the_polars_line(spark, tmp_path, bad):
    folder = tmp_path / "in"
    folder.mkdir()
    rows = handbook_rows(n_users=4, per_user=20)
    write_lines(folder / "a.csv", [HANDBOOK_HEADER, *rows[:40]])
    write_lines(folder / "b.csv", [HANDBOOK_HEADER, *rows[40:60], bad, *rows[60:]])
    with pytest.raises(DataError) as polars:
        prepare(_config(folder), tmp_path / "polars")
    with pytest.raises(DataError) as spark_err:
        prepare(_config(folder), tmp_path / "spark", engine="spark")
    assert str(spark_err.value) == str(polars.value)


def _table(spark, data: Path, name: str, typed: bool) -> str:
    """The CSV files as a catalog table (a temporary view): every column text, as read; or typed as a
    warehouse table would be (a timestamp, a double amount, integer ids and labels)."""
    df = spark.read.csv(str(data), header=True)
    if typed:
        df = df.selectExpr("cast(TRANSACTION_ID as long) TRANSACTION_ID", "to_timestamp(TX_DATETIME) TX_DATETIME",
                           "cast(CUSTOMER_ID as int) CUSTOMER_ID", "cast(TERMINAL_ID as int) TERMINAL_ID",
                           "cast(TX_AMOUNT as double) TX_AMOUNT", "cast(TX_FRAUD as int) TX_FRAUD",
                           "cast(TX_FRAUD_SCENARIO as int) TX_FRAUD_SCENARIO")
    df.createOrReplaceTempView(name)
    return name


@pytest.mark.parametrize("typed", [False, True])
def test_spark_reads_a_catalog_table_as_it_reads_the_files(spark, tmp_path, typed):
    """--table: the same run as the Polars engine on the table's files, whether the table's columns are text
    or typed (a timestamp column is written as text with a fixed format, whatever `time_format` says)."""
    folder = tmp_path / "in"
    folder.mkdir()
    rows = handbook_rows(n_users=6, per_user=20)
    write_lines(folder / "a.csv", [HANDBOOK_HEADER, *rows])
    extra = ['bad_rows="drop"', "split.min_events=3"]
    prepare(_config(folder, extra), tmp_path / "polars")
    table = _table(spark, folder, f"events_{int(typed)}", typed)
    report = prepare(load_dataset_config("handbook", overrides=[*SPLIT, *extra], table=table), tmp_path / "spark",
                     engine="spark")
    assert_same_run(tmp_path / "polars", tmp_path / "spark", ignore=("files",))
    assert report["files"] == [f"table {table}"] and report["rows_read"] == 120


def test_spark_table_errors_name_the_table(spark, tmp_path):
    """A bad value names the table, the partition and the row in it, the column and the value; a missing
    table or column is one line too; the Polars engine refuses a table."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_lines(folder / "a.csv", [HANDBOOK_HEADER, *handbook_rows(n_users=3, per_user=10)[:7],
                                   "9998,2018-05-03 10:00:00,78,3,x,0,0"])
    table = _table(spark, folder, "events_bad", typed=False)
    with pytest.raises(DataError, match=r"^table events_bad \(Spark partition 0 of 1\), row 8, column 'TX_AMOUNT': "
                                        r"not a finite number >= 0 \(value 'x'\)$"):
        prepare(load_dataset_config("handbook", overrides=SPLIT, table=table), tmp_path / "a", engine="spark")
    with pytest.raises(DataError, match=r"^table events_nope: not found in the Spark catalog"):
        prepare(load_dataset_config("handbook", overrides=SPLIT, table="events_nope"), tmp_path / "b", engine="spark")
    spark.read.csv(str(folder), header=True).drop("TX_AMOUNT").createOrReplaceTempView("events_short")
    with pytest.raises(DataError, match=r"^table events_short, column 'TX_AMOUNT': missing column \(the table has"):
        prepare(load_dataset_config("handbook", overrides=SPLIT, table="events_short"), tmp_path / "c", engine="spark")
    rows = handbook_rows(n_users=3, per_user=10)
    write_lines(tmp_path / "dup.csv", [HANDBOOK_HEADER, *rows, rows[0]])
    spark.read.csv(str(tmp_path / "dup.csv"), header=True).createOrReplaceTempView("events_dup")
    with pytest.raises(DataError, match=r"^table events_dup \(Spark partition 0 of 1\), row 31, column "
                                        r"'event_id': duplicate event id \(also at table events_dup "
                                        r"\(Spark partition 0 of 1\), row 1\)"):
        prepare(load_dataset_config("handbook", overrides=SPLIT, table="events_dup"), tmp_path / "e", engine="spark")
    with pytest.raises(ConfigError, match="--engine spark"):
        prepare(load_dataset_config("handbook", overrides=SPLIT, table=table), tmp_path / "d")
    with pytest.raises(ConfigError, match="cannot be given with data"):
        load_dataset_config("handbook", overrides=SPLIT, table=table, data=str(folder))
