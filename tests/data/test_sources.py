"""Source adapters on real samples, and every bad-input case: one clear message, exit code 2."""

from __future__ import annotations

import gzip
from pathlib import Path

import polars as pl
import pytest

from conftest import HANDBOOK_HEADER, handbook_rows, write_lines
from pantherseq.cli import main
from pantherseq.data.schema import load_dataset_config
from pantherseq.data.sources import load_source, recbole_ml100k

CANONICAL = {"user_id": pl.Utf8, "timestamp": pl.Datetime("us")}


def _load(dataset: str, data, **over):
    sets = [f"{k}={v}" for k, v in over.items()]
    return load_source(load_dataset_config(dataset, overrides=sets, data=data))


# -- real samples ------------------------------------------------------------------------------
def test_handbook_reads_gzip_parts_from_a_folder(handbook_dir, tmp_path):
    # two real parts, cut to their first 3,000 lines, in a folder: the folder form of --data
    folder = tmp_path / "hb"
    folder.mkdir()
    for part in sorted(handbook_dir.glob("*.csv.gz"))[:2]:
        with gzip.open(part, "rt") as src, gzip.open(folder / part.name, "wt") as dst:
            for i, line in enumerate(src):
                if i > 3000:
                    break
                dst.write(line)
    loaded = _load("handbook", folder)
    ev = loaded.events
    assert loaded.rows_read == 6000 and ev.height == 6000 and not loaded.dropped
    assert {k: ev.schema[k] for k in CANONICAL} == CANONICAL
    assert ev.schema["amount"] == pl.Float64 and ev.schema["terminal_id"] == pl.Utf8
    assert ev["label"].dtype == pl.Int8 and set(ev["scenario"].unique()) <= {0, 1, 2, 3}
    assert ev["event_id"].n_unique() == 6000
    first = ev.row(0, named=True)
    assert first["user_id"] == "0" and first["amount"] == pytest.approx(123.59)
    assert str(first["timestamp"]) == "2018-04-01 07:19:05"


def test_handbook_glob_of_one_real_part(handbook_dir):
    part = min(handbook_dir.glob("*.csv.gz"))
    loaded = _load("handbook", str(handbook_dir / (part.name[:-12] + "*.csv.gz")))
    assert loaded.files == [str(part)]
    assert loaded.rows_read == loaded.events.height > 200_000
    assert loaded.events["label"].sum() > 0


def test_tabformer_parses_dollars_times_labels_and_joins_the_profile(tabformer_dir):
    loaded = _load("tabformer", tabformer_dir)
    ev = loaded.events
    assert loaded.rows_read == ev.height == 19_963
    assert ev["label"].sum() == 27
    first = ev.row(0, named=True)
    assert first["amount"] == pytest.approx(134.09)
    assert str(first["timestamp"]) == "2002-09-01 06:21:00"
    assert first["use_chip"] == "Swipe Transaction" and first["mcc"] == "5300"
    assert set(ev["errors"].unique()) >= {"none"}
    assert (ev["amount"] < 0).any()  # refunds are kept: TabFormer amounts may be negative
    prof = loaded.profile
    assert prof.height == 2000
    user0 = prof.filter(pl.col("user_id") == "0").row(0, named=True)
    assert user0["age"] == 53 and user0["gender"] == "Female" and user0["state"] == "CA"
    assert user0["income"] == pytest.approx(59696) and user0["cards"] == 5
    assert user0["card_brand"] == "Visa" and user0["card_type"] == "Debit"


def test_movielens_from_the_recbole_wheel():
    if recbole_ml100k() is None:
        pytest.skip("recbole is not installed (make setup installs it with --no-deps)")
    loaded = _load("movielens100k", None)
    assert loaded.rows_read == loaded.events.height == 100_000
    assert loaded.events["user_id"].n_unique() == 943 and loaded.events["item"].n_unique() == 1682
    assert loaded.profile.height == 943 and set(loaded.profile["gender"].unique()) == {"M", "F"}


def test_movielens_from_a_u_data_folder(tmp_path):
    write_lines(tmp_path / "u.data", ["1\t10\t4\t881250949", "1\t11\t3\t881250950", "2\t10\t5\t881250951"])
    write_lines(tmp_path / "u.user", ["1|24|M|technician|85711", "2|53|F|other|94043"])
    loaded = _load("movielens100k", tmp_path)
    assert loaded.events["item"].to_list() == ["10", "11", "10"]
    assert loaded.profile.sort("user_id")["age"].to_list() == [24, 53]


def test_generic_csv_and_parquet_with_profile(tmp_path):
    events = pl.DataFrame({"who": ["a", "a", "b"], "at": ["2024-01-01T10:00:00"] * 3,
                           "price": [1.0, 2.0, 3.0], "shop": ["x", "y", "x"]})
    events.write_parquet(tmp_path / "e.parquet")
    pl.DataFrame({"who": ["a", "b"], "age": [30, 40]}).write_csv(tmp_path / "p.csv")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[columns]
user_id = "who"
timestamp = "at"
[[fields]]
name = "price"
kind = "numeric"
[[fields]]
name = "shop"
[tokenizer]
fields = ["shop"]
[split]
kind = "leave_last_out"
[profile]
path = "{tmp_path / 'p.csv'}"
key = "who"
[[profile.fields]]
name = "age"
kind = "numeric"
""")
    loaded = load_source(load_dataset_config("csv", cfg, data=str(tmp_path / "*.parquet")))
    assert loaded.events["price"].to_list() == [1.0, 2.0, 3.0]
    assert loaded.profile.sort("user_id")["age"].to_list() == [30.0, 40.0]


# -- bad input ---------------------------------------------------------------------------------
def _run(capsys, data: Path, tmp_path: Path, *extra: str) -> tuple[int, str]:
    code = main(["prepare", "--dataset", "handbook", "--data", str(data), "--out", str(tmp_path / "run"),
                 *extra])
    err = capsys.readouterr().err
    return code, err


def _corrupt(tmp_path: Path, row: int, column: str, value: str, header: str = HANDBOOK_HEADER) -> Path:
    rows = handbook_rows()
    cols = HANDBOOK_HEADER.split(",")
    parts = rows[row - 1].split(",")
    parts[cols.index(column)] = value
    rows[row - 1] = ",".join(parts)
    return write_lines(tmp_path / "bad.csv", [header, *rows])


@pytest.mark.parametrize("column,value,words", [
    ("TX_DATETIME", "2018-13-45 99:00:00", "cannot parse the time"),
    ("TX_AMOUNT", "12.5abc", "not a finite number"),
    ("TX_AMOUNT", "-3.50", "not a finite number >= 0"),
    ("TX_AMOUNT", "inf", "not a finite number"),
    ("CUSTOMER_ID", "", "the value is empty"),
    ("TX_FRAUD", "maybe", "a label must be one of"),
])
def test_bad_values_name_file_row_and_column(capsys, tmp_path, column, value, words):
    path = _corrupt(tmp_path, 17, column, value)
    code, err = _run(capsys, path, tmp_path)
    assert code == 2
    assert f"file {path}" in err and "row 17" in err and f"column '{column}'" in err and words in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_ragged_row_names_file_and_row(capsys, tmp_path):
    rows = handbook_rows()
    rows[11] += ",extra"
    path = write_lines(tmp_path / "bad.csv", [HANDBOOK_HEADER, *rows])
    code, err = _run(capsys, path, tmp_path)
    assert code == 2 and f"file {path}" in err and "row 12" in err and "8 fields" in err


def test_missing_and_misnamed_columns(capsys, tmp_path):
    path = write_lines(tmp_path / "bad.csv", [HANDBOOK_HEADER.replace("TX_AMOUNT", "TX_AMOUNTS"),
                                              *handbook_rows()])
    code, err = _run(capsys, path, tmp_path)
    assert code == 2 and "column 'TX_AMOUNT'" in err and "did you mean 'TX_AMOUNTS'" in err
    path = write_lines(tmp_path / "bad.csv", [HANDBOOK_HEADER.replace(",TX_FRAUD_SCENARIO", ""),
                                              *[r.rsplit(",", 1)[0] for r in handbook_rows()]])
    code, err = _run(capsys, path, tmp_path)
    assert code == 2 and "missing column" in err and "TX_FRAUD_SCENARIO" in err


@pytest.mark.parametrize("content,words", [("", "empty"), (HANDBOOK_HEADER + "\n", "no data rows")])
def test_empty_files(capsys, tmp_path, content, words):
    path = tmp_path / "empty.csv"
    path.write_text(content)
    code, err = _run(capsys, path, tmp_path)
    assert code == 2 and str(path) in err and words in err and "Traceback" not in err


def test_missing_path_and_duplicate_ids(capsys, tmp_path, handbook_csv):
    code, err = _run(capsys, tmp_path / "nope", tmp_path)
    assert code == 2 and "does not exist" in err
    dup = tmp_path / "dup.csv"
    lines = handbook_csv.read_text().splitlines()
    lines[5] = "0," + lines[5].split(",", 1)[1]  # event id 0 again, at row 5
    write_lines(dup, lines)
    code, err = _run(capsys, dup, tmp_path)
    assert code == 2 and "duplicate event id" in err and "row 5" in err and "column 'event_id'" in err


def test_drop_mode_counts_every_dropped_row(tmp_path):
    rows = handbook_rows()
    rows[3] = rows[3].replace("2018-", "2018/")  # unparsable time
    rows[8] = ",".join(rows[8].split(",")[:4] + ["n/a"] + rows[8].split(",")[5:])  # bad amount
    parts = rows[9].split(",")
    rows[9] = ",".join(parts[:2] + [""] + parts[3:])  # empty user id
    path = write_lines(tmp_path / "drop.csv", [HANDBOOK_HEADER, *rows])
    loaded = _load("handbook", path, bad_rows='"drop"')
    assert loaded.dropped["unparsable_time:TX_DATETIME"] == 1
    assert loaded.dropped["not_a_number:TX_AMOUNT"] == 1
    assert loaded.dropped["empty:CUSTOMER_ID"] == 1
    assert loaded.rows_read == len(rows) == loaded.events.height + sum(loaded.dropped.values())

