"""A small labelled run for the fraud and serving tests (fixtures registered in tests/conftest.py): the
built-in simulator's genuine behaviour plus injected
"stolen routine" fraud, prepared as a csv-source run, and a tiny PANTHER trained on it for a few seconds.

Stolen routine (an account takeover that changes the routine, SPEC §2): for a few days a victim's own
events are replaced by another user's events of the same days, relabelled as the victim's. Every
fraudulent event is an ordinary event of an ordinary user (normal amounts, hours, merchants, categories),
so hand-made aggregates see little; what changes is whose behaviour it is. Token = merchant x amount
(like the handbook's terminal x amount).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pantherseq.data.schema import SimulateConfig, load_dataset_config
from pantherseq.data.simulate import simulate
from pantherseq.model.base import ModelConfig
from pantherseq.prepare import prepare
from pantherseq.train.loop import PretrainConfig, TrainConfig, train

START = dt.datetime(2024, 1, 1)
DAYS = 70
T1, T2 = "2024-01-25", "2024-01-29"  # the generative model trains before T1, validates until T2
PERIODS = {"train_start": "2024-01-29", "train_end": "2024-02-17", "test_start": "2024-02-24"}
VICTIM_RATE = 0.08
SCENARIO = 9

CONFIG = f"""
name = "stolen_routine"
source = "csv"
[columns]
user_id = "user_id"
timestamp = "timestamp"
label = "label"
scenario = "scenario"
event_id = "event_id"
[[fields]]
name = "merchant_id"
[[fields]]
name = "amount"
kind = "numeric"
bucketing = "log_quantile"
bins = 8
min_value = 0
[[fields]]
name = "category"
[[fields]]
name = "channel"
[[fields]]
name = "hour"
kind = "time"
derive = "hour"
bins = 6
[[fields]]
name = "log_gap"
kind = "time"
derive = "log_gap"
bins = 8
[tokenizer]
fields = ["merchant_id", "amount"]
top_k = 20000
[split]
kind = "time"
t1 = "{T1}"
t2 = "{T2}"
"""


def stolen_routine(events: pl.DataFrame, seed: int = 0) -> pl.DataFrame:
    """Replace 3-7 days of VICTIM_RATE of the users by a random other user's events of those days."""
    rng = np.random.default_rng(seed)
    users = events["user_id"].unique().sort().to_list()
    victims = rng.choice(len(users), int(VICTIM_RATE * len(users)), replace=False)
    day = (pl.col("timestamp") - START).dt.total_days()
    keep, stolen = [], []
    for v in victims:
        donor = users[(v + rng.integers(1, len(users))) % len(users)]
        first = int(rng.integers(28, DAYS - 3))
        last = first + int(rng.integers(3, 8))
        keep.append((pl.col("user_id") == users[v]) & (day >= first) & (day < last))
        stolen.append(events.filter((pl.col("user_id") == donor) & (day >= first) & (day < last))
                      .with_columns(pl.lit(users[v]).alias("user_id"), pl.lit(1, pl.Int8).alias("label"),
                                    pl.lit(SCENARIO, pl.Int16).alias("scenario")))
    dropped = pl.any_horizontal(keep) if keep else pl.lit(False)
    out = pl.concat([events.filter(~dropped), *stolen]).sort("user_id", "timestamp", maintain_order=True)
    return out.with_columns(pl.format("e{}", pl.int_range(pl.len())).alias("event_id"))


@pytest.fixture(scope="session")
def fraud_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fraud")
    sim = simulate(SimulateConfig(n_users=500, days=DAYS, start=START.date().isoformat(), seed=3,
                                  fraud_user_rate=0.0, compromised_merchant_rate=0.0))
    events = stolen_routine(sim.events.drop("event_id"))
    events.write_parquet(root / "events.parquet")
    (root / "config.toml").write_text(CONFIG)
    run = root / "run"
    prepare(load_dataset_config("csv", root / "config.toml", data=str(root / "events.parquet")), run)
    return run


@pytest.fixture(scope="session")
def trained_run(fraud_run: Path) -> Path:
    """fraud_run with a tiny PANTHER trained for 4 epochs (5-15 s) as models/panther. A fixed number of
    epochs, not a time budget, so the outcome does not depend on the machine's load."""
    model = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_len=48, n_prototypes=8, dropout=0.0)
    cfg = PretrainConfig(model=model, train=TrainConfig(epochs=4, batch_size=32, lr=3e-3, warmup_steps=10,
                                                        eval_max_users=100, threads=1, patience=4))
    train(fraud_run, "panther", cfg)
    return fraud_run
