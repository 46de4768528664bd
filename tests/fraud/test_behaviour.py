"""The behaviour pass: windows cover every wanted event once, nothing sees the future, the pooled state is embed()."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pantherseq.data.dataset import RunData
from pantherseq.fraud.behaviour import (
    DeviationVocab,
    behaviour_features,
    delta_from_hidden,
    extend_back,
    scoring_windows,
    window_start,
)
from pantherseq.fraud.personal import WINDOW_SIZES, state_keys
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


@pytest.mark.parametrize(("max_len", "context"), [(16, 10), (16, 15), (16, 3), (8, 100)])
def test_an_events_window_depends_on_the_users_history_alone(max_len, context):
    """Whichever events are wanted, event j of a user is predicted from the window [start + window_start(p), j),
    p = j − start; windows grow to max_len, then restart at context + 1 events (the refresh's re-base)."""
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 80, 20)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    starts = np.repeat(offsets[:-1], counts)
    for _ in range(5):
        want = np.zeros(offsets[-1], bool)
        for u in range(20):
            a = offsets[u] + rng.integers(0, counts[u])
            want[a:min(offsets[u + 1], a + rng.integers(0, counts[u] + 1))] = True
        win, _ = scoring_windows(offsets, want, max_len, context)
        for w0, c0, c1 in win:
            for j in range(c0, c1):
                p = j - starts[j]
                assert w0 == starts[j] + window_start(p, max_len, context)
    ctx = min(max(context, 1), max_len - 1)
    p = np.arange(1, 200)
    n = p - window_start(p, max_len, context)  # window lengths
    assert n.max() <= max_len and np.all((n >= ctx + 1) | (n == p))
    assert np.all((np.diff(n) == 1) | (n[1:] == ctx + 1))  # grows one event at a time, or re-bases


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
    """The window the pass used: its wanted events extended back by the short windows' look-back."""
    win, _ = scoring_windows(offsets, extend_back(np.asarray(offsets), want, max(WINDOW_SIZES) - 1), max_len, context)
    row = win[(win[:, 1] <= j) & (j < win[:, 2])][0]
    return int(row[0])


def test_one_event_equals_the_batch_bit_for_bit_with_copy_and_field_heads(fraud_run, random_model):
    """The service's path for one event (its state's window -> `state_keys`, the one-row prediction and its
    packed compact form, as a state stores it) gives every per-event feature of the offline path (`delta_from_hidden` over chunks of events, `key_window`) as the
    same float32: field heads, copy head and seen counts included."""
    data = RunData(fraud_run)
    vocab = DeviationVocab(data.tokenizer, random_model)
    assert vocab.copy is not None and vocab.heads.each and "copy_mass" in vocab.delta_names
    seq = data.seq
    offsets = np.asarray(seq.offsets).astype(np.int64)
    starts = np.repeat(offsets[:-1], np.diff(offsets))
    tokens, codes = np.asarray(seq.tokens), np.asarray(seq.codes)
    rng = np.random.default_rng(0)
    j = np.sort(rng.choice(np.flatnonzero(np.arange(len(tokens)) > starts), 40, replace=False))
    h = torch.from_numpy(rng.normal(size=(len(j), random_model.cfg.d_model)).astype(np.float32))
    batched = delta_from_hidden(vocab, h, j, (tokens, codes, starts), pos_chunk=16)
    assert list(batched) == vocab.delta_names
    for i, e in enumerate(j):
        w0 = max(int(starts[e]), int(e) - vocab.reach)
        keys, key_codes = state_keys(tokens[w0:e], codes[w0:e], vocab.reach)
        stored = vocab.unpack(vocab.pack(vocab.predict(h[i:i + 1]))[0], h[i].numpy())  # as a state keeps it
        for pred in (vocab.predict(h[i:i + 1]), stored):
            one = vocab.deviation(pred, torch.tensor([int(tokens[e])]),
                                  torch.from_numpy(codes[e:e + 1].astype(np.int64)), keys, key_codes)
            for k, val in one.items():
                assert torch.equal(val, batched[k][i:i + 1]) or (val.isnan().all() and batched[k][i].isnan()), k


def test_window_means_are_the_mean_of_the_events_own_deltas(fraud_run, random_model):
    """mean<k>_<name> of an event = the mean of <name> over it and its k − 1 predecessors, each as computed
    for itself (the pass computes the predecessors before the wanted period too, then leaves them out)."""
    data = RunData(fraud_run)
    t = np.asarray(data.seq.time)
    user = np.asarray(data.user_of)
    want = (t >= np.quantile(t, 0.9)) & (user < 40)
    ctx = random_model.cfg.max_len - 1  # one window per event: every event's Δ is the same in both passes
    a = behaviour_features(random_model, data, want, context=ctx)
    every = behaviour_features(random_model, data, extend_back(np.asarray(data.seq.offsets), want, 19),
                               context=ctx, lookback=0)
    assert a.delta["mean20_surprisal"].shape == a.index.shape and len(a.index) > 100
    starts = np.asarray(data.seq.offsets)[user]
    for name in ("surprisal", "copy_surprisal", "head_surprisal_merchant_id"):
        ref = dict(zip(every.index.tolist(), every.delta[name].tolist()))
        for k in (5, 20):
            for i, j in enumerate(a.index):
                vals = [ref[e] for e in range(max(j - k + 1, starts[j]), j + 1) if e in ref and not np.isnan(ref[e])]
                got = a.delta[f"mean{k}_{name}"][i]
                assert (np.isnan(got) and not vals) or got == pytest.approx(np.mean(vals), rel=1e-6), (name, k, j)
