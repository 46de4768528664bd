"""Shared fixtures: where the real data is (skip cleanly when absent) and tiny event tables."""

from __future__ import annotations

import os
from pathlib import Path

# As the CLI does (MEASURED.md): OpenMP busy-waiting makes 2-thread torch collapse when the other core is busy
# (a server or a training subprocess the test started, another job on the machine): a 60-step tiny-model test
# took 60 s with it and 2 s without. Must precede torch's first import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PANTHERSEQ_DATA", REPO.parent / "shared" / "data"))
HANDBOOK = SHARED_DATA / "fraud-handbook"
TABFORMER = SHARED_DATA / "tabformer"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set PANTHERSEQ_DATA to the shared data folder)")
    return path


@pytest.fixture
def handbook_dir() -> Path:
    return need(HANDBOOK)


@pytest.fixture
def tabformer_dir() -> Path:
    return need(TABFORMER)


HANDBOOK_HEADER = "TRANSACTION_ID,TX_DATETIME,CUSTOMER_ID,TERMINAL_ID,TX_AMOUNT,TX_FRAUD,TX_FRAUD_SCENARIO"


def handbook_rows(n_users: int = 6, per_user: int = 30) -> list[str]:
    """Small valid handbook-format rows: April..September 2018, a few frauds."""
    rows, tx = [], 0
    for u in range(n_users):
        for i in range(per_user):
            month = 4 + (i * 6) // per_user
            day = 1 + (i * 7 + u) % 27
            fraud = int(i % 11 == 5)
            rows.append(f"{tx},2018-{month:02d}-{day:02d} {(8 + i) % 24:02d}:{i % 60:02d}:07,{u},"
                        f"{(u * 7 + i) % 13},{10 + (i * 37 + u * 11) % 190}.{i % 100:02d},{fraud},{2 * fraud}")
            tx += 1
    return rows


@pytest.fixture
def handbook_csv(tmp_path: Path) -> Path:
    path = tmp_path / "hb.csv"
    path.write_text("\n".join([HANDBOOK_HEADER, *handbook_rows()]) + "\n")
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_frame() -> pl.DataFrame:
    """A canonical frame (as sources produce, plus gap_s) for tokenizer tests."""
    import datetime as dt

    start = dt.datetime(2024, 1, 1, 8)
    rows = []
    for u in range(5):
        for i in range(40):
            rows.append({
                "user_id": f"u{u}",
                "timestamp": start + dt.timedelta(hours=7 * i + u),
                "amount": float(1 + (i * 13 + u * 5) % 200),
                "channel": ["chip", "online", "swipe"][(i + u) % 3],
                "category": ["grocery", "fuel", "coffee", "travel"][(i * u) % 4],
            })
    frame = pl.DataFrame(rows).sort(["user_id", "timestamp"])
    gap = (pl.col("timestamp").diff().dt.total_microseconds() / 1e6).over("user_id").alias("gap_s")
    return frame.with_columns(gap)


@pytest.fixture
def tiny_events() -> pl.DataFrame:
    return tiny_frame()


SMALL = ["simulate.n_users=120", "simulate.days=40", "split.t1=\"2024-01-28\"", "split.t2=\"2024-02-03\""]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A small simulated run (120 users, 40 days), prepared once per test module."""
    from pantherseq.data.schema import load_dataset_config
    from pantherseq.prepare import prepare

    run = tmp_path_factory.mktemp("sim") / "run"
    prepare(load_dataset_config("simulated", overrides=SMALL), run)
    return run


# the labelled stolen-routine run and its tiny PANTHER, shared by the fraud and serving tests (session scope)
from stolen_routine import fraud_run, trained_run  # noqa: F401
