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
from pantherseq.errors import DataError
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


def assert_same_run(a: Path, b: Path) -> None:
    ja, jb = (json.loads((p / "prepare.json").read_text()) for p in (a, b))
    assert {k: v for k, v in ja.items() if k != "wall_s"} == {k: v for k, v in jb.items() if k != "wall_s"}
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
