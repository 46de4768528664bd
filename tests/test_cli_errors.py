"""Every user error named in issue 11 ends the real CLI with exit code 2 and one line on stderr, no traceback.

Each case runs `python -m pantherseq.cli` in a subprocess. Log records (INFO lines the CLI writes to stderr
while a stage runs) are not the error: the error is the one other line, the last one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HANDBOOK_HEADER, handbook_rows, write_lines
from pantherseq.cli import main

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")
CSV_CONFIG = """
name = "tiny"
source = "csv"
[columns]
user_id = "CUSTOMER_ID"
timestamp = "TX_DATETIME"
time_format = "%Y-%m-%d %H:%M:%S"
[[fields]]
name = "terminal_id"
column = "TERMINAL_ID"
[[fields]]
name = "amount"
kind = "numeric"
column = "TX_AMOUNT"
bins = 4
[tokenizer]
fields = ["terminal_id", "amount"]
[split]
kind = "time"
t1 = "2018-08-01"
t2 = "2018-09-01"
"""


def cli(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PANTHERSEQ_MALLOC": "system"}
    return subprocess.run([sys.executable, "-m", "pantherseq.cli", *map(str, args)], check=False,
                          capture_output=True, text=True, env=env, timeout=300)


def error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The one error line; asserts exit code 2, no traceback, no other line but log records."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert len(lines) == 1, proc.stderr[-2000:]
    line = lines[0]
    assert line == proc.stderr.strip().splitlines()[-1]
    assert re.match(r"^pantherseq \w+: error: ", line), line
    for word in words:
        assert word in line, (word, line)
    assert len(line) < 700, line
    return line


def csv_run(tmp_path: Path, rows: list[str], header: str = HANDBOOK_HEADER, *sets: str,
            out: str = "run") -> subprocess.CompletedProcess:
    data = write_lines(tmp_path / "data.csv", [header, *rows])
    config = tmp_path / "tiny.toml"
    config.write_text(CSV_CONFIG)
    extra = [a for s in sets for a in ("--set", s)]
    return cli("prepare", "--dataset", "csv", "--config", config, "--data", data, *extra, "--out", tmp_path / out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny simulated run with a Markov model (a count model: trained in a second)."""
    run = tmp_path_factory.mktemp("cli_errors") / "a"
    assert main(["prepare", "--dataset", "simulated", "--set", "simulate.n_users=40", "--out", str(run)]) == 0
    assert main(["pretrain", "--run", str(run), "--model", "markov"]) == 0
    return run


# -- (a) corrupt, truncated or empty checkpoints ------------------------------------------------------
@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_damaged_checkpoint_names_the_file(trained, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ckpt = run / "models" / "markov" / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\x00not a zip" * 50}[damage])
    error_line(cli("evaluate", "--run", run), str(ckpt), "cannot be read")


# -- (b) a checkpoint from another run ------------------------------------------------------------------
def test_checkpoint_from_another_run_says_so(trained, tmp_path):
    other = tmp_path / "b"
    assert main(["prepare", "--dataset", "simulated", "--set", "simulate.n_users=40", "--set", "simulate.seed=1",
                 "--out", str(other)]) == 0
    shutil.copytree(trained / "models", other / "models")
    line = error_line(cli("evaluate", "--run", other), "belongs to another run", "checkpoint.pt")
    assert "changed" not in line


# -- (c) a CSV that is not UTF-8 ---------------------------------------------------------------------------
def _latin1_csv(tmp_path: Path) -> Path:
    rows = handbook_rows()
    parts = rows[6].split(",")
    parts[3] = "caf\xe9"  # TERMINAL_ID, written as Latin-1 below
    rows[6] = ",".join(parts)
    path = tmp_path / "data.csv"
    path.write_bytes(("\n".join([HANDBOOK_HEADER, *rows]) + "\n").encode("latin-1"))
    lines = path.read_bytes().splitlines()
    bad = next(i for i, line in enumerate(lines) if b"\xe9" in line)
    assert bad == 7  # data row 7
    return path


def test_non_utf8_csv_names_file_row_and_column(tmp_path):
    data = _latin1_csv(tmp_path)
    (tmp_path / "tiny.toml").write_text(CSV_CONFIG)
    proc = cli("prepare", "--dataset", "csv", "--config", tmp_path / "tiny.toml", "--data", data,
               "--out", tmp_path / "run")
    error_line(proc, str(data), "row 7", "'TERMINAL_ID'", "UTF-8")


def test_non_utf8_rows_are_dropped_and_counted(tmp_path):
    data = _latin1_csv(tmp_path)
    (tmp_path / "tiny.toml").write_text(CSV_CONFIG)
    assert main(["prepare", "--dataset", "csv", "--config", str(tmp_path / "tiny.toml"), "--data", str(data),
                 "--set", "bad_rows=drop", "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "prepare.json").read_text())
    assert report["rows_dropped"] == {"not_utf8:TERMINAL_ID": 1}
    assert report["rows_kept"] == report["rows_read"] - 1


# -- (d) evaluate --split foo --------------------------------------------------------------------------------
def test_unknown_split_names_the_argument_and_the_valid_ones(trained):
    error_line(cli("evaluate", "--run", trained, "--split", "test,foo"), "--split", "'foo'", "valid, test")


# -- (e) --out pointing at a file ------------------------------------------------------------------------------
def test_out_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    proc = cli("prepare", "--dataset", "simulated", "--set", "simulate.n_users=20", "--out", tmp_path / "taken")
    error_line(proc, "--out", str(tmp_path / "taken"), "file")


# -- (f) preparing again over trained models -------------------------------------------------------------------
def test_prepare_over_trained_models_needs_force(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    args = ("prepare", "--dataset", "simulated", "--set", "simulate.n_users=40", "--out", run)
    error_line(cli(*args), "trained models", "markov", "--force")
    assert cli(*args, "--force").returncode == 0


# -- (g) what used to be accepted silently ---------------------------------------------------------------------------
def test_duplicate_header_columns(tmp_path):
    proc = csv_run(tmp_path, handbook_rows(), HANDBOOK_HEADER + ",TX_AMOUNT")
    error_line(proc, "data.csv", "'TX_AMOUNT'", "more than once")


def test_overlong_categorical_value(tmp_path):
    rows = handbook_rows()
    parts = rows[3].split(",")
    parts[3] = "T" * 5000
    rows[3] = ",".join(parts)
    line = error_line(csv_run(tmp_path, rows), "data.csv", "row 4", "'TERMINAL_ID'", "256")
    assert "T" * 200 not in line
    assert csv_run(tmp_path, rows, HANDBOOK_HEADER, "max_value_chars=6000", out="ok").returncode == 0


def test_overlong_values_are_dropped_and_counted(tmp_path):
    rows = handbook_rows()
    parts = rows[3].split(",")
    parts[3] = "T" * 300
    rows[3] = ",".join(parts)
    data = write_lines(tmp_path / "data.csv", [HANDBOOK_HEADER, *rows])
    (tmp_path / "tiny.toml").write_text(CSV_CONFIG)
    assert main(["prepare", "--dataset", "csv", "--config", str(tmp_path / "tiny.toml"), "--data", str(data),
                 "--set", "bad_rows=drop", "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "prepare.json").read_text())
    assert report["rows_dropped"] == {"too_long:TERMINAL_ID": 1}


def test_timestamp_outside_the_year_range(tmp_path):
    rows = handbook_rows()
    parts = rows[9].split(",")
    parts[1] = "1960-05-01 10:00:00"
    rows[9] = ",".join(parts)
    error_line(csv_run(tmp_path, rows), "data.csv", "row 10", "'TX_DATETIME'", "1970..2100")
    assert csv_run(tmp_path, rows, HANDBOOK_HEADER, "min_year=1950", out="ok").returncode == 0


@pytest.mark.parametrize("t1,t2,part", [("2018-08-01", "2018-08-01", "valid"), ("2018-08-01", "2019-01-01", "test")])
def test_empty_split_part(tmp_path, t1, t2, part):
    proc = csv_run(tmp_path, handbook_rows(), HANDBOOK_HEADER, f'split.t1="{t1}"', f'split.t2="{t2}"')
    error_line(proc, f"the {part} part is empty")


def test_pretrain_with_no_training_targets(tmp_path):
    # only user 0's first event (2018-04-01) is before t1: nobody has a next training event to predict
    assert csv_run(tmp_path, handbook_rows(), HANDBOOK_HEADER, 'split.t1="2018-04-02"').returncode == 0
    error_line(cli("pretrain", "--run", tmp_path / "run", "--model", "markov"), "no targets")
    assert not (tmp_path / "run" / "models").exists()


def test_a_data_error_names_a_file_or_a_table_by_its_kind_not_its_name():
    """A file whose name starts with "table " is still a file; a catalog table is named as one."""
    from pantherseq.errors import DataError

    assert str(DataError("bad", file="table 2024.csv", row=3)) == "file table 2024.csv, row 3: bad"
    err = DataError("bad", table="db.events (Spark partition 0 of 2)", row=3, column="amount", value="x")
    assert str(err) == "table db.events (Spark partition 0 of 2), row 3, column 'amount': bad (value 'x')"
    assert err.reason == "bad" and err.table.startswith("db.events")


@pytest.mark.parametrize("flag, value, words", [("--linger", "5", ("--linger", "[0, 1]", "5.0")),
                                                 ("--batch-size", "0", ("--batch-size", "at least 1"))])
def test_refresh_worker_settings_out_of_range(tmp_path, flag, value, words):
    error_line(cli("refresh", "--run", tmp_path, "--store", f"sqlite:///{tmp_path / 's.db'}", flag, value), *words)
