"""`prepare` end to end: files written, counts reconcile, split, sequences agree with events."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from conftest import HANDBOOK_HEADER, handbook_rows, write_lines
from pantherseq.data.schema import load_dataset_config
from pantherseq.data.sequences import Sequences
from pantherseq.prepare import prepare
from pantherseq.tokenizer import UNK, StructuredTokenizer


def _prepare(path, tmp_path, *sets):
    cfg = load_dataset_config("handbook", overrides=list(sets), data=str(path))
    return prepare(cfg, tmp_path / "run"), tmp_path / "run"


def test_prepare_writes_a_consistent_run(handbook_csv, tmp_path):
    report, run = _prepare(handbook_csv, tmp_path)
    for name in ("prepare.json", "tokenizer.json", "config.toml", "events.parquet", "users.parquet",
                 "sequences/meta.json", "sequences/tokens.npy"):
        assert (run / name).is_file(), name
    assert json.loads((run / "prepare.json").read_text()) == json.loads(json.dumps(report, default=str))
    assert report["rows_read"] == 180 == report["rows_kept"] and report["rows_dropped"] == {}
    assert report["users"] == 6
    split = report["split"]
    assert sum(split["events"].values()) == 180 and split["kind"] == "time"

    seq = Sequences.load(run / "sequences")
    events = pl.read_parquet(run / "events.parquet")
    assert isinstance(seq.tokens, np.memmap)  # memory-mapped, not loaded into Python objects
    assert seq.n_users == 6 and seq.n_events == 180
    assert np.array_equal(seq.tokens, events["token"].to_numpy())
    assert np.array_equal(seq.split, events["split"].to_numpy())
    assert seq.codes.shape == (180, 5) and seq.field_names == ["terminal_id", "amount", "hour", "weekday",
                                                               "log_gap"]
    # chronological within each user, and the time split follows t1 / t2
    for u in range(seq.n_users):
        t = seq.time[seq.user_slice(u)]
        assert np.all(np.diff(t) >= 0)
    t1 = np.datetime64("2018-08-01").astype("datetime64[s]").astype(np.int64)
    assert np.all((seq.time < t1) == (seq.split == 0))
    # labels carried through
    assert seq.label.sum() == events["label"].sum() > 0
    assert np.all(np.isnan(seq.gap[seq.offsets[:-1]]))

    tok = StructuredTokenizer.load(run / "tokenizer.json")
    assert tok.vocab_size == report["vocab_size"]
    assert report["coverage"] == pytest.approx(np.mean(seq.tokens != UNK))
    # the tokenizer was fitted on the training period only: every training event is covered
    assert np.all(seq.tokens[seq.split == 0] != UNK)


def test_counts_reconcile_when_rows_are_dropped(tmp_path):
    rows = handbook_rows()
    rows[0] = rows[0].replace("2018-04", "2018-4x")
    rows += ["9999,2018-05-01 10:00:00,77,1,10.00,0,0"]  # a user with a single event
    path = write_lines(tmp_path / "hb.csv", [HANDBOOK_HEADER, *rows])
    report, _ = _prepare(path, tmp_path, 'bad_rows="drop"', "split.min_events=2")
    assert report["rows_dropped"] == {"unparsable_time:TX_DATETIME": 1, "user_too_short": 1}
    assert report["rows_read"] == report["rows_kept"] + sum(report["rows_dropped"].values()) == 181


def test_unk_users_and_top_k(handbook_csv, tmp_path):
    report, run = _prepare(handbook_csv, tmp_path, "tokenizer.top_k=5")
    assert report["vocab_size"] == 9
    seq = Sequences.load(run / "sequences")
    per_user = [np.any(seq.tokens[seq.user_slice(u)] == UNK) for u in range(seq.n_users)]
    assert report["unk_users"] == pytest.approx(np.mean(per_user))
    assert 0 < report["coverage"] < 1


def test_leave_last_out_keeps_file_order_for_ties(tmp_path):
    lines = ["user_id\titem_id\trating\ttimestamp",
             *[f"1\t{i}\t3\t{100 + i}" for i in range(5)], "1\t50\t4\t200", "1\t51\t4\t200",
             *[f"2\t{i}\t3\t{100 + i}" for i in range(4)]]
    write_lines(tmp_path / "ml-100k.inter", lines)
    cfg = load_dataset_config("movielens100k", data=str(tmp_path))
    prepare(cfg, tmp_path / "run")
    ev = pl.read_parquet(tmp_path / "run" / "events.parquet")
    u1 = ev.filter(pl.col("user_id") == "1")
    # items 50 and 51 share a timestamp: file order decides, so 51 is the test event
    assert u1["item"].to_list()[-2:] == ["50", "51"] and u1["split"].to_list()[-2:] == [1, 2]
    assert ev.filter(pl.col("user_id") == "2")["split"].to_list() == [0, 0, 1, 2]


def test_windows_cover_every_training_transition(handbook_csv, tmp_path):
    _, run = _prepare(handbook_csv, tmp_path)
    seq = Sequences.load(run / "sequences")
    win = seq.windows(max_len=8)
    assert np.all(win[:, 1] - win[:, 0] <= 8) and np.all(win[:, 1] - win[:, 0] >= 2)
    assert np.all(seq.split[win[:, 0]] == 0) and np.all(seq.split[win[:, 1] - 1] == 0)
    targets = set()
    for s, e in win.tolist():
        targets.update(range(s + 1, e))
    train = np.flatnonzero(seq.split == 0)
    first_of_user = set(seq.offsets[:-1].tolist())
    assert targets == {i for i in train.tolist() if i not in first_of_user}
    every = seq.windows(max_len=1000, split=None)
    assert len(every) == seq.n_users and np.array_equal(every[:, 1] - every[:, 0], np.diff(seq.offsets))


def test_cli_help_and_prepare_run_as_a_program(handbook_csv, tmp_path):
    out = subprocess.run([sys.executable, "-m", "pantherseq.cli", "prepare", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--dataset" in out and "--data" in out and "--out" in out
    res = subprocess.run([sys.executable, "-m", "pantherseq.cli", "prepare", "--dataset", "handbook",
                          "--data", str(handbook_csv), "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert "coverage" in res.stdout and (tmp_path / "r" / "prepare.json").is_file()
    res = subprocess.run([sys.executable, "-m", "pantherseq.cli", "prepare", "--dataset", "handbook",
                          "--data", str(handbook_csv), "--set", "tokenizer.topk=5", "--out", str(tmp_path)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 2 and "unknown key(s) topk" in res.stderr and "Traceback" not in res.stderr
