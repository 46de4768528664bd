"""The refresh's incremental update (serve/windows.py): a user's state refreshed by extending the cached model
window equals the full forward of the same window (float64, 1e-9) across re-bases, for PANTHER and the
Transformer; a cache miss or eviction gives the same states; and the served states equal the offline pass's
at a context that re-bases every 28 events."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from pantherseq.data.dataset import RunData, gap_buckets
from pantherseq.data.schema import DAY
from pantherseq.data.sequences import Sequences
from pantherseq.fraud.behaviour import behaviour_features, exact_hidden, running_mean
from pantherseq.model.base import ModelConfig
from pantherseq.serve.embed import event_amounts, user_states
from pantherseq.serve.scorer import Scorer, parse_time
from pantherseq.serve.windows import Windows, window_len
from pantherseq.train.loop import PretrainConfig, TrainConfig, train
from stolen_routine import PERIODS

CONTEXT = 20  # of max_len 48: chunks of 28 events, windows of 21 .. 48


def _scorer(run: Path, name: str, max_bytes: int = 64 << 20) -> Scorer:
    om = Scorer(run, name)
    om.context = CONTEXT  # as a fraud report's `context` would set it
    om.model_windows = Windows(om.model64, CONTEXT, max_bytes)
    return om


@pytest.fixture(scope="module")
def transformer_run(trained_run, tmp_path_factory) -> Path:
    """A copy of the served run with a tiny Transformer trained for 2 epochs."""
    run = tmp_path_factory.mktemp("transformer") / "run"
    # without the fraud report other tests may have written into the shared run (it names panther)
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("models", "fraud*"))
    model = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_len=48, dropout=0.0)
    train(run, "transformer", PretrainConfig(model=model, train=TrainConfig(
        epochs=2, batch_size=32, lr=3e-3, warmup_steps=10, eval_max_users=50, threads=1, patience=4)))
    return run


@pytest.fixture(params=["panther", "transformer"])
def run_model(request, trained_run) -> tuple[Path, str]:
    if request.param == "panther":
        return trained_run, "panther"
    return request.getfixturevalue("transformer_run"), "transformer"


def _records(seq: Sequences, gaps: np.ndarray, a: int, b: int) -> list[tuple[int, dict]]:
    """The events [a, b) of the run as logged records (seq, record), as the service logs them."""
    return [(j + 1, {"time": int(seq.time[j]), "fields": {}, "token": int(seq.tokens[j]),
                     "codes": [int(c) for c in seq.codes[j]], "gap": int(gaps[j]), "window": []}) for j in range(a, b)]


def _full64(om: Scorer, state) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 state after the window's last event and the window's mean state, by `model.hidden`."""
    n = window_len(state, om.max_len, om.context)
    batch = om._batch([state], [(len(state.tokens) - n, len(state.tokens))])
    with torch.no_grad():
        hid = exact_hidden(om.model64, batch)
    return hid[0, n - 1], running_mean(hid)[0, n - 1]


def _replay(om: Scorer, seq: Sequences, users: list[int], steps: np.ndarray, check=None) -> list:
    """Every event of `users` from their first, folded `steps[i]` at a time and refreshed (all users in one
    batch per round); `check(state)` after each refresh. Returns the last states."""
    gaps = gap_buckets(np.asarray(seq.gap, dtype=np.float64))
    states = [om.new_state(f"u{u}") for u in users]
    pos = [int(seq.offsets[u]) for u in users]
    for k in steps:
        for r, u in enumerate(users):
            b = min(pos[r] + int(k), int(seq.offsets[u + 1]))
            states[r] = om.fold(states[r], _records(seq, gaps, pos[r], b))
            pos[r] = b
        states = om.refresh(states, 0.0)
        for st in states:
            if check is not None and len(st.tokens):
                check(st)
    return states


def test_incremental_states_equal_the_full_forward_across_rebases(run_model):
    run, name = run_model
    om = _scorer(run, name)
    seq = Sequences.load(om.run.sequences)
    users = np.argsort(-np.diff(seq.offsets))[:6].tolist()  # the longest histories
    assert np.diff(seq.offsets)[users].min() > 2 * om.max_len  # several re-bases each
    steps = np.random.default_rng(0).integers(1, 4, 120)  # 1..3 new events per refresh
    worst = [0.0]

    def check(st):
        h, pooled = _full64(om, st)
        n = window_len(st, om.max_len, om.context)
        win = om.model_windows.lru.get(st.user_id, (st.n_events - n, st.user_idx))
        assert win is not None and len(win.tokens) == n
        worst[0] = max(worst[0], float((win.last - h).abs().max()), float((win.total / n - pooled).abs().max()))
        assert np.array_equal(st.h, h.to(torch.float32).numpy()) or np.abs(st.h - h.numpy()).max() < 1e-6

    _replay(om, seq, users, steps, check)
    assert worst[0] < 1e-9, worst[0]
    # mostly extended; computed afresh at the first refresh and at every re-base (28 events)
    assert om.model_windows.hits > 4 * om.model_windows.misses and om.model_windows.misses >= 3 * len(users)


def test_a_miss_or_eviction_gives_the_same_states(trained_run):
    """A cache that keeps nothing (every refresh a full forward), one that keeps everything, and one whose
    cached windows no longer match the state (another worker refreshed the user with other events) agree."""
    kept, evicting = _scorer(trained_run, "panther"), _scorer(trained_run, "panther", max_bytes=1)
    seq = Sequences.load(kept.run.sequences)
    users = np.argsort(-np.diff(seq.offsets))[6:10].tolist()
    steps = np.random.default_rng(1).integers(1, 3, 60)
    a = _replay(kept, seq, users, steps)
    b = _replay(evicting, seq, users, steps)
    assert len(evicting.model_windows.lru) == 0 and evicting.model_windows.hits == 0 and kept.model_windows.hits > 0
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.h, y.h, rtol=0, atol=1e-6)
        np.testing.assert_allclose(x.pooled, y.pooled, rtol=0, atol=1e-6)
    # a state whose window's events differ from the cached ones: recomputed, not extended
    st = a[0]
    other = type(st)(**{**st.__dict__, "tokens": st.tokens.copy()})
    other.tokens[-2] = st.tokens[-1] if st.tokens[-1] != st.tokens[-2] else st.tokens[-3]
    misses = kept.model_windows.misses
    got = kept.refresh([other], 0.0)[0]
    assert kept.model_windows.misses == misses + 1
    h, _ = _full64(kept, other)
    np.testing.assert_allclose(got.h, h.to(torch.float32).numpy(), rtol=0, atol=1e-6)


def test_served_states_equal_the_offline_states(trained_run):
    """States embedded at the test period's start, then each test event folded in and refreshed incrementally:
    the state before every event equals the offline pass's state for it (`behaviour_features`, same context),
    the windows re-based every 28 events on both sides."""
    om = _scorer(trained_run, "panther")
    data = RunData(om.run)
    seq = data.seq
    cut = parse_time(PERIODS["test_start"])[0]
    t = np.asarray(seq.time)
    want = (t >= cut) & (t < cut + 3 * DAY)
    off = behaviour_features(om.model, data, want, context=CONTEXT, lookback=0)
    recent = dict(zip(off.index.tolist(), off.recent))
    ids = om.run.read_users()["user_id"].cast(pl.Utf8).to_list()
    states = {s.user_id: s for batch in user_states(om, seq, event_amounts(om, None, seq.n_events), ids, cut)
              for s in batch}
    gaps = gap_buckets(np.asarray(seq.gap, dtype=np.float64))
    checked, equal = 0, 0
    for u in range(seq.n_users):
        js = np.flatnonzero(want[seq.user_slice(u)]) + int(seq.offsets[u])
        if not len(js) or ids[u] not in states:
            continue
        st = states[ids[u]]
        for j in js.tolist():
            if j in recent:  # the state before event j (folded up to j − 1 and refreshed)
                diff = np.abs(st.h - recent[j]).max()
                assert diff < 1e-6, (u, j, diff)
                checked, equal = checked + 1, equal + int(diff == 0)
            st = om.refresh([om.fold(st, _records(seq, gaps, j, j + 1))], 0.0)[0]
    assert checked > 300 and equal > 0.99 * checked
    assert om.model_windows.hits > om.model_windows.misses > 0
