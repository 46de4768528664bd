"""Training streams a sharded run's shards (data/shards.py): every training window once per epoch, the same
windows as the merged path, disjoint shards and equal step counts per rank, and a 3-shard run trains."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import SMALL
from pantherseq.data.dataset import RunData
from pantherseq.errors import DataError

MAX_LEN, BATCH = 16, 8


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    from pantherseq.data.schema import load_dataset_config
    from pantherseq.prepare import prepare

    run = tmp_path_factory.mktemp("sharded") / "run"
    prepare(load_dataset_config("simulated", overrides=[*SMALL, "sequences.shards=3"]), run)
    return run


def _rows(batches) -> Counter:
    """Each batch row as (user, its input tokens): a window's identity."""
    out = Counter()
    for b in batches:
        for u, toks in zip(b.users.tolist(), b.tokens.numpy()):
            out[(u, toks[toks != 0].tobytes())] += 1
    return out


def test_streaming_sees_every_training_window_once_per_epoch(sharded_run):
    data = RunData(sharded_run)
    assert data.stream is not None and data._seq is None  # nothing merged to train
    streamed = list(data.train_batches(MAX_LEN, BATCH, seed=1))
    assert data._seq is None
    assert len(streamed) == data.train_steps(MAX_LEN, BATCH)
    merged = _rows(data.train_batches(MAX_LEN, BATCH, seed=1, stream=False))
    assert _rows(streamed) == merged and max(merged.values()) == 1
    assert sum(len(w) for w in data.stream.windows(MAX_LEN + 1)) == sum(merged.values())
    assert data.n_train_targets(MAX_LEN) == sum(int((b.tokens != 0).sum()) for b in streamed)


def test_streaming_order_follows_the_seed(sharded_run):
    data = RunData(sharded_run)
    first = [b.users.tolist() for b in data.train_batches(MAX_LEN, BATCH, seed=1)]
    assert first == [b.users.tolist() for b in data.train_batches(MAX_LEN, BATCH, seed=1)]
    assert first != [b.users.tolist() for b in data.train_batches(MAX_LEN, BATCH, seed=2)]


def test_two_ranks_read_disjoint_shards_in_equal_steps(sharded_run):
    data = RunData(sharded_run)
    ranks = [list(data.train_batches(MAX_LEN, BATCH, seed=0, rank=r, world=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == data.train_steps(MAX_LEN, BATCH, world=2) > 0
    users = [{u % 3 for b in batches for u in b.users.tolist()} for batches in ranks]
    assert users[0] <= {0, 2} and users[1] == {1}  # rank r reads shards r, r + 2, ...
    a, b = _rows(ranks[0]), _rows(ranks[1])
    assert not set(a) & set(b)
    with pytest.raises(DataError, match="3 shards for 4 ranks"):
        next(data.train_batches(MAX_LEN, BATCH, seed=0, rank=0, world=4))


@pytest.mark.slow
def test_a_sharded_run_trains(sharded_run):
    from pantherseq.model.base import ModelConfig
    from pantherseq.train.loop import PretrainConfig, TrainConfig, train

    cfg = PretrainConfig(model=ModelConfig(d_model=16, n_layers=1, n_heads=2, max_len=MAX_LEN, n_prototypes=4),
                         train=TrainConfig(epochs=1, batch_size=BATCH, threads=1, eval_max_users=20))
    metrics = train(sharded_run, "panther", cfg)
    assert metrics["epochs"] == 1 and np.isfinite(metrics["valid"]["mrr"])
    assert 0 < metrics["train_targets"] <= RunData(sharded_run).n_train_targets(MAX_LEN)
