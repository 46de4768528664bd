"""The copy-head, new-vs-known and short-window features (fraud/personal.py) on hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pantherseq.data.schema import N_SPECIAL, PAD
from pantherseq.fraud.behaviour import extend_back
from pantherseq.fraud.personal import (
    WINDOW_SIZES,
    CopyWeights,
    copy_features,
    copy_pointer,
    key_window,
    seen_counts,
    state_keys,
    window_features,
    window_matrix,
    window_means,
)
from pantherseq.model.heads import N_DISTANCE_BUCKETS, CopyHead

T0 = N_SPECIAL  # the first regular token id


def test_key_window_is_right_aligned_and_stops_at_the_user_start():
    tokens = np.array([10, 11, 12, 13, 14, 15])  # user A rows 0-2, user B rows 3-5
    codes = np.arange(12).reshape(6, 2)
    keys, kc = key_window(tokens, codes, starts=np.array([0, 3, 3]), j=np.array([2, 4, 5]), reach=3)
    assert keys.tolist() == [[PAD, 10, 11], [PAD, PAD, 13], [PAD, 13, 14]]
    assert kc[2].tolist() == [[0, 0], [6, 7], [8, 9]]
    # the service's state window gives the same layout
    sk, skc = state_keys(tokens[3:5], codes[3:5], reach=3)
    assert sk.tolist() == keys[2:].tolist() and torch.equal(skc, kc[2:])
    empty, _ = state_keys(np.zeros(0, np.int32), np.zeros((0, 2), np.int32), reach=3)
    assert empty.tolist() == [[PAD, PAD, PAD]]


def test_seen_counts_say_new_or_known():
    keys = torch.tensor([[T0, T0 + 1, T0]])
    key_codes = torch.tensor([[[5, 1], [6, 1], [5, 2]]])
    seen = seen_counts(keys.expand(3, -1), key_codes.expand(3, -1, -1), torch.tensor([T0, T0 + 7, 1]),
                       torch.tensor([[5, 2], [9, 0], [6, 1]]), ["merchant", "hour"])
    assert seen["seen_token"][:2].tolist() == [2.0, 0.0]  # known twice; new
    assert math.isnan(seen["seen_token"][2])  # UNK (id 1) observed: cannot be matched
    assert seen["seen_merchant"].tolist() == [2.0, 0.0, 1.0]  # merchant 9 is new to the user
    assert seen["seen_hour"][0] == 1.0 and math.isnan(seen["seen_hour"][1]) and seen["seen_hour"][2] == 2.0


def _zero_copy(d: int, gate_b: float) -> CopyWeights:
    z = torch.zeros(d, d, dtype=torch.float64)
    return CopyWeights(z, torch.zeros(T0 + 10, d, dtype=torch.float64), torch.zeros(N_DISTANCE_BUCKETS,
                       dtype=torch.float64), torch.zeros(d, dtype=torch.float64), torch.tensor(gate_b, dtype=torch.float64))


def test_a_flat_pointer_gives_the_personal_frequency():
    cw = _zero_copy(4, gate_b=0.0)  # q = 0: a flat pointer over the visible keys; g = sigmoid(0) = 1/2
    keys = torch.tensor([[PAD, T0, 1, T0 + 1, T0], [PAD, PAD, PAD, PAD, PAD]])  # 1 = UNK: no key
    a, g = copy_pointer(cw, torch.zeros(2, 4, dtype=torch.float64), keys)
    assert a[0].tolist() == pytest.approx([0, 1 / 3, 0, 1 / 3, 1 / 3]) and a[1].tolist() == [0.0] * 5
    assert g.tolist() == [0.5, 0.0]  # no key: no copy
    f = copy_features(a, g, keys, torch.tensor([T0, T0]), torch.tensor([0.1, 0.1], dtype=torch.float64))
    assert f["copy_mass"].tolist() == pytest.approx([2 / 3, 0.0])
    assert f["copy_gate"].tolist() == [0.5, 0.0]
    assert f["copy_surprisal"].tolist() == pytest.approx([-math.log(0.5 * 0.1 + 0.5 * 2 / 3), -math.log(0.1)])
    unk = copy_features(a, g, keys, torch.tensor([1, 1]), torch.tensor([math.nan, math.nan], dtype=torch.float64))
    assert unk["copy_mass"].isnan().all() and unk["copy_surprisal"].isnan().all()


def test_the_distance_bias_prefers_recent_keys():
    cw = _zero_copy(2, gate_b=0.0)
    cw.dist_bias[0] = math.log(3.0)  # distance 0 (the event just before) three times as likely
    a, _ = copy_pointer(cw, torch.zeros(1, 2, dtype=torch.float64), torch.tensor([[T0, T0 + 1]]))
    assert a[0].tolist() == pytest.approx([0.25, 0.75])


def test_copy_pointer_is_the_models_copy_head():
    """Our float64 pointer from h equals CopyHead.forward's at the window's last position (keys = the window)."""
    torch.manual_seed(0)
    d, t, vocab = 8, 7, T0 + 20
    head, emb = CopyHead(d), torch.nn.Embedding(vocab, d, padding_idx=PAD)
    torch.nn.init.normal_(head.distance_bias.weight)
    tokens = torch.tensor([[PAD, T0 + 3, 1, T0 + 5, T0 + 3, T0 + 9, T0 + 2]])
    h = torch.randn(1, t, d)
    with torch.no_grad():
        _, a_ref, g_ref = head(h, tokens, None, emb)
        model = torch.nn.Module()
        model.copy, model.token_emb = head, emb
        a, g = copy_pointer(CopyWeights.of(model), h[0, -1:].double(), tokens)
    assert a[0].tolist() == pytest.approx(a_ref[0, -1].tolist(), abs=1e-6)
    assert g.item() == pytest.approx(g_ref[0, -1].item(), abs=1e-6)


def test_window_means_skip_undefined_values():
    v = np.array([[np.nan, 1.0, 2.0, 6.0], [np.nan, np.nan, np.nan, np.nan], [np.nan, np.nan, np.nan, 4.0]],
                 np.float32)
    m = window_means(v)
    assert m[0] == 3.0 and math.isnan(m[1]) and m[2] == 4.0
    f = window_features({"s": v}, sizes=(2, 4))
    assert f["mean2_s"].tolist()[0] == 4.0 and f["mean4_s"].tolist()[0] == 3.0  # the current event included


def test_window_features_of_several_names_equal_one_name_at_a_time():
    rng = np.random.default_rng(0)
    v = {n: np.where(rng.random((50, 20)) < 0.2, np.nan, rng.normal(size=(50, 20)) * 10).astype(np.float32)
         for n in ("a", "b", "c")}
    both = window_features(v)
    assert list(both) == [f"mean{k}_{n}" for k in WINDOW_SIZES for n in v]
    for n, x in v.items():
        for k in WINDOW_SIZES:
            assert np.array_equal(both[f"mean{k}_{n}"], window_means(x[:, 20 - k:]), equal_nan=True)


def test_window_matrix_takes_the_users_own_predecessors():
    index = np.array([1, 2, 3, 5, 6])  # user A rows 0-3 (row 0 has no value), user B rows 4-6 (row 4 has none)
    values = np.array([10, 20, 30, 50, 60], np.float32)
    starts = np.array([0, 0, 0, 4, 4])
    m = window_matrix(index, values, starts, k=3)
    nan = np.nan
    np.testing.assert_array_equal(m, np.array([[nan, nan, 10], [nan, 10, 20], [10, 20, 30], [nan, nan, 50],
                                               [nan, 50, 60]], np.float32))


def test_extend_back_adds_each_users_predecessors():
    offsets = np.array([0, 5, 8, 10])
    want = np.zeros(10, bool)
    want[[3, 4, 7, 9]] = True  # user C (rows 8-9) wants row 9 only
    got = extend_back(offsets, want, 2)
    assert np.flatnonzero(got).tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert np.array_equal(extend_back(offsets, want, 0), want)
