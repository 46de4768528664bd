"""Training streams a sharded run's shards (data/shards.py): every training window once per epoch, the same
windows as the merged path, disjoint shards and equal step counts per rank, and a 3-shard run trains."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

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


@pytest.mark.parametrize("stream", [True, False])
def test_views_are_slices_of_the_same_users_training_windows(sharded_run, stream):
    """PANTHER's self-contrastive views: after the windows, one per window, of its user, inside one of the
    user's training windows, at least view_min events where the window has them, without targets; the
    windows themselves are the batches without views; the positives are the pairs of rows of one user."""
    data, view_min = RunData(sharded_run), 5
    plain = list(data.train_batches(MAX_LEN, BATCH, seed=4, stream=stream))
    viewed = list(data.train_batches(MAX_LEN, BATCH, seed=4, stream=stream, view_min=view_min))
    assert len(plain) == len(viewed) > 0
    seq = data.seq  # the merged run, to find each view's events
    train = {}
    for w in data.train_windows(MAX_LEN + 1):
        u = int(np.searchsorted(np.asarray(seq.offsets), w[0], side="right") - 1)
        train.setdefault(int(seq.users[u]) if seq.users is not None else u, []).append(np.asarray(seq.tokens)[w[0]:w[1] - 1])
    short = 0
    for p, v in zip(plain, viewed):
        n = len(p.users)
        assert len(v.users) == 2 * n and torch.equal(v.users[:n], p.users) and torch.equal(v.users[n:], p.users)
        T = p.tokens.shape[1]
        assert torch.equal(v.tokens[:n, :T], p.tokens) and torch.equal(v.targets[:n, :T], p.targets)
        assert (v.targets[n:] == 0).all() and (v.target_codes[n:] == 0).all()
        same = v.users[:, None] == v.users[None, :]
        assert torch.equal(v.positives, same & ~torch.eye(2 * n, dtype=torch.bool))
        for u, toks in zip(v.users[n:].tolist(), v.tokens[n:].numpy()):
            toks = toks[toks != 0]
            inside = [w for w in train[u] if any(np.array_equal(w[i:i + len(toks)], toks)
                                                 for i in range(len(w) - len(toks) + 1))]
            assert inside, f"user {u}: a view outside the user's training windows"
            assert len(toks) >= min(view_min, max(len(w) for w in inside))
            short += len(toks) < max(len(w) for w in train[u])
    assert short > 0  # views are slices, not copies of whole windows


@pytest.mark.slow
def test_a_sharded_run_trains(sharded_run):
    from pantherseq.model.base import ModelConfig
    from pantherseq.train.loop import PretrainConfig, TrainConfig, train

    cfg = PretrainConfig(model=ModelConfig(d_model=16, n_layers=1, n_heads=2, max_len=MAX_LEN, n_prototypes=4),
                         train=TrainConfig(epochs=1, batch_size=BATCH, threads=1, eval_max_users=20))
    metrics = train(sharded_run, "panther", cfg)
    assert metrics["epochs"] == 1 and np.isfinite(metrics["valid"]["mrr"])
    assert 0 < metrics["train_targets"] <= RunData(sharded_run).n_train_targets(MAX_LEN)


@pytest.fixture(scope="module")
def one_shard_run(tmp_path_factory) -> Path:
    """The data of `sharded_run` in one folder."""
    from pantherseq.data.schema import load_dataset_config
    from pantherseq.prepare import prepare

    run = tmp_path_factory.mktemp("one_shard") / "run"
    prepare(load_dataset_config("simulated", overrides=SMALL), run)
    return run


def _no_merge(m: pytest.MonkeyPatch) -> None:
    """Any merge of the shards (RunData.seq, Sequences.load on a sharded folder) raises."""
    from pantherseq.data import sequences

    def refuse(*_args, **_kwargs):
        raise AssertionError("the shards were merged")

    m.setattr(sequences, "merge_shards", refuse)
    m.setattr(RunData, "seq", property(refuse))


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        assert value == pytest.approx(b[k], rel=1e-5, abs=1e-9), k


def test_sharded_evaluation_windows_are_the_merged_ones(sharded_run, one_shard_run):
    """The same targets (as (user, first target time)) and window lengths, shard by shard, never merged."""
    one, many = RunData(one_shard_run), RunData(sharded_run)

    def keyed(data: RunData, windows: np.ndarray, times: np.ndarray) -> Counter:
        return Counter((int(b.users[0]), int(times[i]), int(w[1]))
                       for b, (i, w) in zip(data.eval_batches(windows, 1), enumerate(windows)))

    for split, max_users in (("valid", None), ("test", 30)):
        w1 = one.eval_windows(split, MAX_LEN, max_users=max_users, seed=3)
        with pytest.MonkeyPatch.context() as m:
            _no_merge(m)
            wn = many.eval_windows(split, MAX_LEN, max_users=max_users, seed=3)
            tn = np.concatenate([np.asarray(many.shard(i)[0].time) for i in range(many.shards)])
            got = keyed(many, wn, tn[wn[:, 2]])
        assert len(wn) == len(w1) > 0
        assert got == keyed(one, w1, np.asarray(one.seq.time)[w1[:, 2]])


@pytest.mark.slow
def test_a_sharded_run_trains_and_evaluates_as_one_shard(sharded_run, one_shard_run, monkeypatch):
    """`pretrain` on 3 shards never merges them (target check, steps, validation, prototypes), and its model
    scores what it scores on the one-shard run of the same data; a count model fits the same on both."""
    from pantherseq.cli import main
    from pantherseq.eval.nextevent import evaluate_split
    from pantherseq.eval.prototypes import prototype_analysis
    from pantherseq.model.base import ModelConfig
    from pantherseq.run import read_json
    from pantherseq.train.checkpoint import load_model
    from pantherseq.train.loop import PretrainConfig, TrainConfig, train

    with monkeypatch.context() as m:
        _no_merge(m)
        assert main(["pretrain", "--run", str(sharded_run), "--model", "panther", "--name", "p3",
                     "--set", "model.d_model=16", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
                     "--set", f"model.max_len={MAX_LEN}", "--set", "model.n_prototypes=4",
                     "--set", "train.epochs=1", "--set", f"train.batch_size={BATCH}", "--set", "train.threads=1",
                     "--set", "train.eval_max_users=40"]) == 0
        model, _ = load_model(sharded_run, "p3")
        many = RunData(sharded_run)
        sharded = {split: evaluate_split(model, many, split, MAX_LEN) for split in ("valid", "test")}
        proto = prototype_analysis(model, many, "p3")
    metrics = read_json(sharded_run / "models" / "p3" / "metrics.json")
    assert "error" not in read_json(sharded_run / "prototypes.json")["p3"]
    one = RunData(one_shard_run)
    _close(metrics["valid"], evaluate_split(model, one, "valid", MAX_LEN, max_users=40, seed=0))
    for split, res in sharded.items():
        assert res["n"] > 0
        _close(res, evaluate_split(model, one, split, MAX_LEN))
    merged = prototype_analysis(model, one, "p3")
    assert proto["grams"] == merged["grams"] and proto["counts"] == merged["counts"]

    cfg = PretrainConfig(model=ModelConfig(max_len=MAX_LEN), train=TrainConfig(batch_size=BATCH, eval_max_users=None))
    with monkeypatch.context() as m:
        _no_merge(m)
        counted = train(sharded_run, "markov", cfg)
    _close(counted["valid"], train(one_shard_run, "markov", cfg)["valid"])


def test_a_run_data_of_some_users_cuts_their_batches(sharded_run, one_shard_run):
    """`RunData.of_sequences` (a Spark task's users) cuts the batches the whole run cuts for those users."""
    from pantherseq.data.sequences import load_shard

    one = RunData(one_shard_run)
    part = load_shard(sharded_run / "sequences", 1).take_users(np.array([0, 2, 3]))
    some = RunData.of_sequences(sharded_run, part, one.profile)
    offsets, glob = np.asarray(part.offsets), np.asarray(part.users)
    a = some._batch(offsets[:-1], np.diff(offsets) - 1, history=4)
    b = one._batch(np.asarray(one.seq.offsets)[glob], np.diff(offsets) - 1, history=4)
    assert a.users.tolist() == glob.tolist() == [1, 7, 10]
    for name in ("tokens", "targets", "codes", "gap_bucket", "profile_cat", "profile_num", "history"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
