"""`embed --engine spark` writes the states of the single-process `embed` (within 1e-6, `recent_delta` too), to
Parquet and the store, from one folder of sequences or from shards, and keeps the store-identity check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pantherseq.data import sequences
from pantherseq.data.sequences import Sequences
from pantherseq.errors import ConfigError
from pantherseq.serve.embed import embed_users
from pantherseq.serve.identity import write_owner
from pantherseq.serve.scorer import Scorer
from pantherseq.serve.state import UserState
from pantherseq.spark.embed import embed_spark
from pantherseq.store import open_store
from stolen_routine import PERIODS

pytestmark = [pytest.mark.slow, pytest.mark.spark]
UNTIL = PERIODS["test_start"]
FIELDS = ("h", "pooled", "top_p", "amounts")


def _states(url: str) -> dict[str, UserState]:
    with open_store(url) as store:
        meta = json.loads(store.get_meta("embed"))
        n = meta["users"]
        users = pl.read_parquet(Path(meta["run"]) / "users.parquet")["user_id"].cast(pl.Utf8).to_list()
        got = store.get_many(users)
    states = {k: UserState.decode(v) for k, v in zip(users, got) if v is not None}
    assert len(states) == n
    return states


@pytest.fixture(scope="module")
def single(trained_run: Path, tmp_path_factory) -> dict[str, UserState]:
    url = f"sqlite:///{tmp_path_factory.mktemp('single') / 'states.db'}"
    with open_store(url) as store:
        embed_users(Scorer(trained_run, "panther"), store, UNTIL, batch_size=64, progress=False)
    return _states(url)


def _assert_same(a: dict[str, UserState], b: dict[str, UserState]) -> None:
    assert a.keys() == b.keys() and len(a) > 100
    for user, x in a.items():
        y = b[user]
        assert (x.user_idx, x.n_events, x.last_time, x.model_version) == (y.user_idx, y.n_events, y.last_time,
                                                                         y.model_version)
        for name in ("tokens", "codes", "gap", "times", "top_ids"):
            assert np.array_equal(getattr(x, name), getattr(y, name)), name
        for name in FIELDS:
            assert np.allclose(getattr(x, name), getattr(y, name), rtol=0, atol=1e-6), name
        assert x.recent_delta.shape == y.recent_delta.shape, user  # computed by the executors too
        assert np.allclose(x.recent_delta, y.recent_delta, rtol=0, atol=1e-6, equal_nan=True), user
    assert sum(len(x.recent_delta) for x in a.values()) > 0


def _sharded(trained_run: Path, out: Path, shards: int) -> Path:
    """A copy of the run with its sequences dealt into `shards` shards."""
    shutil.copytree(trained_run, out)
    seq = Sequences.load(trained_run / "sequences", mmap=False)
    shutil.rmtree(out / "sequences")
    seq.save_shards(out / "sequences", shards)
    return out


def test_single_process_embed_streams_shards(trained_run, single, tmp_path, monkeypatch):
    """The single-process embed reads a sharded run shard by shard (never merged) and writes the states it
    writes from one folder."""
    run = _sharded(trained_run, tmp_path / "run", 3)
    scorer = Scorer(run, "panther")

    def merged(parts):
        raise AssertionError("embed merged the shards")
    monkeypatch.setattr(sequences, "merge_shards", merged)
    url = f"sqlite:///{tmp_path / 'states.db'}"
    with open_store(url) as store:
        embed_users(scorer, store, UNTIL, batch_size=64, progress=False)
    _assert_same(single, _states(url))


@pytest.mark.parametrize("shards", [1, 3])
def test_spark_embed_writes_the_single_process_states(spark, trained_run, single, tmp_path, shards):
    run = _sharded(trained_run, tmp_path / "run", shards) if shards > 1 else trained_run
    url = f"sqlite:///{tmp_path / 'states.db'}"
    meta = embed_spark(Scorer(run, "panther"), url, tmp_path / "states.parquet", UNTIL, batch_size=50,
                       users_per_task=120)
    assert meta["tasks"] >= 3 and meta["engine"] == "spark"
    _assert_same(single, _states(url))
    table = pl.read_parquet(tmp_path / "states.parquet" / "*.parquet")
    assert table.height == meta["users"] and table["user_id"].n_unique() == table.height
    row = table.filter(pl.col("user_id") == table["user_id"][0])
    assert np.allclose(np.array(row["h"][0]), single[row["user_id"][0]].h, atol=1e-6)


def test_spark_embed_refuses_a_store_of_another_run(spark, trained_run, tmp_path):
    url = f"sqlite:///{tmp_path / 'states.db'}"
    with open_store(url) as store:
        write_owner(store, "another-run", "panther@0")
    with pytest.raises(ConfigError, match="another run"):
        embed_spark(Scorer(trained_run, "panther"), url, tmp_path / "states.parquet", UNTIL)
    assert not (tmp_path / "states.parquet").exists()


def test_spark_embed_writes_redis_from_the_executors(spark, trained_run, single, tmp_path, redis_url):
    import redis

    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()
    meta = embed_spark(Scorer(trained_run, "panther"), redis_url, tmp_path / "states.parquet", UNTIL,
                       users_per_task=200)
    assert meta["tasks"] >= 2
    _assert_same(single, _states(redis_url))
