"""Sharded sequences (data/sequences.py) and fitting from statistics (encoders.quantiles): the properties
the Spark engine relies on to write the same run as the Polars one."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pantherseq.data.sequences import Sequences, load_shards
from pantherseq.encoders import quantiles, sorted_values
from pantherseq.prepare import prepare


def _sequences(lengths: list[int]) -> Sequences:
    n = int(sum(lengths))
    return Sequences(offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                     tokens=np.arange(n, dtype=np.int32), codes=np.arange(2 * n, dtype=np.int32).reshape(n, 2),
                     time=np.arange(n, dtype=np.int64), gap=np.full(n, np.nan, np.float32),
                     label=np.zeros(n, np.int8), scenario=np.zeros(n, np.int16), split=np.zeros(n, np.int8),
                     field_names=["a", "b"])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=0, max_size=15), st.integers(1, 5))
def test_shards_round_trip_to_the_same_sequences(tmp_path_factory, lengths, shards):
    folder = tmp_path_factory.mktemp("seq")
    seq = _sequences(lengths)
    seq.save_shards(folder, shards)
    parts = load_shards(folder)
    assert len(parts) == shards
    for i, part in enumerate(parts):  # user u lives in shard u % shards
        users = part.users if part.users is not None else np.arange(part.n_users)
        assert (users % shards == i).all()
    back = Sequences.load(folder)
    assert np.array_equal(back.offsets, seq.offsets)
    for name in ("tokens", "codes", "time", "split"):
        assert np.array_equal(getattr(back, name), getattr(seq, name))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=300), st.integers(2, 120))
def test_quantiles_from_order_statistics_equal_numpy(values, bins):
    x = np.asarray(values)
    qs = np.concatenate([np.linspace(0, 1, bins + 1)[1:-1], [0.001, 0.999]])
    assert np.array_equal(quantiles(x.size, qs, sorted_values(x.copy())), np.quantile(x, qs))


@pytest.mark.parametrize("shards", [1, 3])
def test_prepare_writes_shards_that_load_as_one(tmp_path, handbook_csv, shards):
    from pantherseq.data.schema import load_dataset_config

    sets = ["split.t1=\"2018-06-01\"", "split.t2=\"2018-08-01\"", f"sequences.shards={shards}"]
    one = prepare(load_dataset_config("handbook", overrides=sets[:2], data=str(handbook_csv)), tmp_path / "one")
    many = prepare(load_dataset_config("handbook", overrides=sets, data=str(handbook_csv)), tmp_path / "many")
    assert many["shards"] == shards and one["rows_kept"] == many["rows_kept"]
    a, b = Sequences.load(tmp_path / "one" / "sequences"), Sequences.load(tmp_path / "many" / "sequences")
    assert np.array_equal(a.offsets, b.offsets) and np.array_equal(a.tokens, b.tokens)
    assert len(load_shards(tmp_path / "many" / "sequences")) == shards


def test_train_fraction_takes_a_fixed_seeded_share_of_the_windows(run_dir, tmp_path):
    from pantherseq.data.dataset import RunData
    from pantherseq.errors import ConfigError
    from pantherseq.train.loop import TrainConfig, load_pretrain_config

    full = RunData(run_dir).train_windows(17)
    part = RunData(run_dir, train_fraction=0.25).train_windows(17)
    assert len(part) == round(0.25 * len(full)) and np.array_equal(part, RunData(run_dir, 0.25).train_windows(17))
    assert {tuple(w) for w in part} <= {tuple(w) for w in full}
    data = RunData(run_dir, train_fraction=0.25)
    assert data.train_steps(16, 4) == -(-len(part) // 4)
    assert sum(len(b.tokens) for b in data.train_batches(16, 4, seed=1)) == len(part)
    assert TrainConfig().data_fraction == 1.0
    with pytest.raises(ConfigError, match="data_fraction"):
        load_pretrain_config(overrides=["train.data_fraction=0"])
