"""The behaviour pass: windows cover every wanted event once, nothing sees the future, the pooled state is embed()."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pantherseq.data.dataset import RunData
from pantherseq.fraud.behaviour import behaviour_features, scoring_windows
from pantherseq.model.base import ModelConfig
from pantherseq.model.registry import build_model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_windows_cover_every_wanted_event_once_with_context(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 60, 30)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    want = np.zeros(offsets[-1], bool)
    for u in range(30):  # a contiguous suffix-ish range of each user
        a = offsets[u] + rng.integers(0, counts[u])
        want[a:a + rng.integers(0, counts[u])] = True
        want[offsets[u + 1]:] = False
    max_len, context = 16, 10
    win, chunk = scoring_windows(offsets, want, max_len, context)
    assert chunk == 6
    covered = np.concatenate([np.arange(c0, c1) for _, c0, c1 in win]) if len(win) else np.zeros(0, int)
    firsts = offsets[:-1]
    expected = np.flatnonzero(want & ~np.isin(np.arange(len(want)), firsts))
    assert np.array_equal(np.sort(covered), expected)  # each once, users' first events excluded
    user = np.searchsorted(offsets, win[:, 1], side="right") - 1
    assert np.all(win[:, 0] >= offsets[user]) and np.all(win[:, 2] <= offsets[user + 1])
    assert np.all(win[:, 2] - 1 - win[:, 0] <= max_len)  # inputs [w0, c1 - 1)
    assert np.all((win[:, 1] - 1 - win[:, 0] >= context) | (win[:, 0] == offsets[user]))


@pytest.fixture(scope="module")
def random_model(fraud_run):
    data = RunData(fraud_run)
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, max_len=24, n_prototypes=4, dropout=0.0)
    return build_model("panther", cfg, data.info).eval()


def test_changing_future_events_leaves_past_features_unchanged(fraud_run, random_model):
    data = RunData(fraud_run)
    t = np.asarray(data.seq.time)
    start, cut = np.quantile(t, 0.7), np.quantile(t, 0.85)
    want = t >= start
    a = behaviour_features(random_model, data, want, context=12, batch_windows=16)
    rng = np.random.default_rng(0)
    future = t >= cut
    tokens, codes = np.array(data.seq.tokens), np.array(data.seq.codes)
    tokens[future] = rng.integers(1, data.info.vocab_size, int(future.sum()))
    codes[future] = rng.integers(0, 3, codes[future].shape)
    data.seq.tokens, data.seq.codes = tokens, codes
    b = behaviour_features(random_model, data, want, context=12, batch_windows=7)  # other batches too
    assert np.array_equal(a.index, b.index)
    past = ~future[a.index]
    assert past.sum() > 500 and (~past).sum() > 500
    for name in a.delta:
        np.testing.assert_allclose(a.delta[name][past], b.delta[name][past], rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    np.testing.assert_allclose(a.pooled[past], b.pooled[past], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.recent[past], b.recent[past], rtol=1e-4, atol=1e-5)
    assert not np.allclose(a.delta["surprisal"][~past], b.delta["surprisal"][~past], equal_nan=True)


def test_user_state_is_embed_of_the_history_window(fraud_run, random_model):
    data = RunData(fraud_run)
    t = np.asarray(data.seq.time)
    want = t >= np.quantile(t, 0.9)
    f = behaviour_features(random_model, data, want, context=12)
    seq = data.seq
    for j in f.index[:: max(len(f.index) // 20, 1)]:
        u = int(data.user_of[j])
        s = int(seq.offsets[u])
        pos = int(np.searchsorted(f.index, j))
        w0 = _window_start(seq.offsets, want, u, j, max_len=24, context=12)
        batch = data._batch(np.array([w0]), np.array([j - w0]))  # the history [w0, j), strictly before j
        with torch.no_grad():
            e = random_model.embed(batch)[0].numpy()
            h = random_model.hidden(batch)[0, -1].numpy()
        np.testing.assert_allclose(f.pooled[pos], e, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(f.recent[pos], h, rtol=1e-4, atol=1e-5)
        assert w0 >= s


def _window_start(offsets, want, u, j, max_len, context):
    win, _ = scoring_windows(offsets, want, max_len, context)
    row = win[(win[:, 1] <= j) & (j < win[:, 2])][0]
    return int(row[0])
