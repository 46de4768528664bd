"""Each deviation feature Δ on hand-made distributions, and the compact prediction a serving state keeps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pantherseq.fraud import deviation
from pantherseq.fraud.deviation import (
    Heads,
    PackedWidths,
    Prediction,
    collision_entropy,
    deviation_features,
    embedding_distance,
    field_marginal,
    field_members,
    field_onehot,
    head_features,
    member_mass,
    predict,
    rank_above,
    standardised_deviation,
    upper_tail_surprisal,
)

P = torch.tensor([[0.5, 0.25, 0.125, 0.125]], dtype=torch.float64)


def rows(p: torch.Tensor, n: int) -> torch.Tensor:
    return p.expand(n, -1)


def plain(p: torch.Tensor, n: int):
    """An output layer whose logits are log P for every h: D = 1, h = 1, weight 0, bias log p."""
    v = p.shape[1]
    return (torch.ones(n, 1, dtype=torch.float64), torch.zeros(v, 1, dtype=torch.float64),
            torch.log(p[0]).to(torch.float64))


def features(p: torch.Tensor, n: int, codes: np.ndarray | None = None, size: int = 0, keep_marginal: bool = True):
    """(prediction, weight, bias, members) of the plain layer for n positions; with `codes`, one token field
    of `size` codes, its marginal kept or read from its members."""
    h, w, b = plain(p, n)
    members = [] if codes is None else [field_members(codes, size)]
    onehots = {0: field_onehot(codes, size, torch.float64)} if codes is not None and keep_marginal else {}
    return predict(h, w.t().contiguous(), b, onehots), w, b, members


def no_fields(n: int) -> torch.Tensor:
    """The observed codes of n events when the prediction has no token field."""
    return torch.zeros(n, 0, dtype=torch.int64)


def test_surprisal_is_minus_log_p_and_rank_counts_strictly_higher_tokens():
    pred, w, b, _ = features(P, 5)
    f = deviation_features(pred, w, b, torch.tensor([0, 1, 2, 3, -1]), no_fields(5), [], [])
    assert f["surprisal"][:4].tolist() == pytest.approx([math.log(2), math.log(4), math.log(8), math.log(8)])
    assert f["rank"][:4].tolist() == [1.0, 2.0, 3.0, 3.0]  # the two 0.125 tokens tie: both rank 3
    assert math.isnan(f["surprisal"][4]) and math.isnan(f["rank"][4])  # UNK observed: undefined
    assert f["is_unk"].tolist() == [0, 0, 0, 0, 1]


def test_rank_is_capped_and_the_same_from_every_logit_or_the_highest(monkeypatch):
    monkeypatch.setattr(deviation, "RANK_CAP", 3)
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]], dtype=torch.float64).expand(6, -1)
    obs = torch.arange(6)
    full = rank_above(logits, logits[0, obs])
    top = rank_above(logits[:, :3], logits[0, obs])
    assert full.tolist() == [1.0, 2.0, 3.0, 4.0, 4.0, 4.0] == top.tolist()  # beyond the cap: cap + 1
    # a logit recomputed a few ulps off (a dot product instead of the batched product) is not "higher"
    assert rank_above(logits[:1], torch.tensor([4.0 - 1e-14], dtype=torch.float64)).item() == 2.0


def test_standardised_deviation_and_collision_entropy_by_hand():
    # mu = 1/4; E[p^2] = (0.25 + 0.0625 + 2 * 0.015625) / 4 = 0.0859375; sigma^2 = 0.0859375 - 0.0625
    sigma = math.sqrt(0.0859375 - 0.0625)
    ss = torch.tensor([0.34375] * 3, dtype=torch.float64)
    d = standardised_deviation(torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64), ss, 4)
    assert d.tolist() == pytest.approx([0.25 / sigma, 0.0, -0.125 / sigma], rel=1e-5)
    flat = standardised_deviation(torch.tensor([0.25], dtype=torch.float64), torch.tensor([0.25], dtype=torch.float64), 4)
    assert flat.tolist() == [0.0]  # a uniform prediction: no deviation, no division by zero
    h = collision_entropy(torch.tensor([1.0, 0.25], dtype=torch.float64))
    assert h.tolist() == pytest.approx([0.0, math.log(4)], abs=1e-6)


@pytest.mark.parametrize("keep_marginal", [True, False])
def test_field_surprisal_marginalises_over_tokens_sharing_the_value(keep_marginal):
    """The same mass whether the prediction keeps the field's marginal or reads its members' logits."""
    codes = np.array([1, 1, 2, 3])  # tokens 0 and 1 carry value 1, token 2 value 2, token 3 value 3
    pred, w, b, members = features(P, 5, codes, 5, keep_marginal=keep_marginal)  # code 4: no token
    obs_codes = torch.tensor([[1], [2], [3], [0], [4]])
    f = deviation_features(pred, w, b, torch.zeros(5, dtype=torch.int64), obs_codes, members, ["m"])
    s = f["surprisal_m"]
    assert s[:3].tolist() == pytest.approx([-math.log(0.75), math.log(8), math.log(8)])
    assert math.isnan(s[3]) and math.isnan(s[4])  # the field's UNK and an uncarried value
    mass = member_mass(pred.h, pred.log_z, w, b, obs_codes[:, 0], members[0])
    assert mass.tolist() == pytest.approx([0.75, 0.125, 0.125, 0.0, 0.0])


def test_field_members_table():
    ids, valid = field_members(np.array([2, 0, 2, 1]), size=3)
    assert ids.shape == (3, 2)
    got = {c: sorted(ids[c][valid[c]].tolist()) for c in range(3)}
    assert got == {0: [1], 1: [3], 2: [0, 2]}


def test_embedding_distance_is_one_minus_cosine():
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    pred = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    d = embedding_distance(pred, w, torch.tensor([0, 1, 2, -1]))
    assert d[:3].tolist() == pytest.approx([0.0, 1.0, 2.0])
    assert math.isnan(d[3])


def test_deviation_features_agree_with_the_parts():
    torch.manual_seed(0)
    h, w, b = torch.randn(6, 3), torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    logits = h.double() @ w.t() + b
    obs = torch.tensor([0, 1, 2, 3, -1, 2])
    codes = torch.tensor([[1], [1], [2], [3], [2], [0]])
    members = [field_members(np.array([1, 1, 2, 3]), 4)]
    p = torch.softmax(logits, 1)
    pred = predict(h, w.t().contiguous(), b, {0: field_onehot(np.array([1, 1, 2, 3]), 4, torch.float64)})
    f = deviation_features(pred, w, b, obs, codes, members, ["merchant"], {0})
    assert all(v.dtype == torch.float32 for v in f.values())
    assert torch.allclose(f["surprisal"][:4].double(), -torch.log_softmax(logits, 1)[torch.arange(4), obs[:4]],
                          atol=1e-6)
    assert f["is_unk"].tolist() == [0, 0, 0, 0, 1, 0]
    assert math.isnan(f["surprisal"][4]) and not math.isnan(f["surprisal_merchant"][4])  # UNK keeps fields
    assert f["surprisal_merchant"][0] == pytest.approx(-math.log(float(p[0, 0] + p[0, 1])), rel=1e-5)
    assert math.isnan(f["surprisal_merchant"][5])
    assert torch.allclose(f["log_rank"][:4], torch.log(f["rank"][:4]))
    assert f["tail_merchant"][2] == pytest.approx(-math.log(float(p[2, 2] + p[2, 3])), rel=1e-5)
    assert f["entropy2"][0].item() == pytest.approx(-math.log(float((p[0] ** 2).sum())), rel=1e-5)


def _random_case(rng, v, d, n):
    codes_a, codes_b = rng.integers(1, 400, v), rng.integers(1, 6, v)  # a: over MAX_MARGINAL_CODES (members)
    members = [field_members(codes_a, 401), field_members(codes_b, 7)]
    onehots = {1: field_onehot(codes_b, 7, torch.float64)}
    heads = Heads.of([(torch.tensor(rng.normal(size=(c, d))), torch.tensor(rng.normal(size=c))) for c in (300, 5)])
    h = torch.tensor(rng.normal(size=(n, d)), dtype=torch.float32)
    w = torch.tensor(rng.normal(size=(v, d)), dtype=torch.float64)
    bias = torch.tensor(rng.normal(size=v), dtype=torch.float64)
    obs = rng.integers(-1, v, n)
    obs_codes = torch.from_numpy(np.stack([np.where(obs >= 0, codes_a[obs], rng.integers(0, 401, n)),
                                           np.where(obs >= 0, codes_b[obs], rng.integers(0, 7, n))], 1))
    return members, onehots, heads, h, w, bias, torch.from_numpy(obs), obs_codes


def _all(pred, w, bias, obs, obs_codes, members, heads):
    return (deviation_features(pred, w, bias, obs, obs_codes, members, ["a", "b"], {1})
            | head_features(pred, heads, obs_codes, ["a", "b"]))


def test_one_event_and_the_stored_compact_prediction_equal_the_batch_bit_for_bit(monkeypatch):
    """The service scores one event from the compact prediction its state stores (packed, unpacked) with the
    same `deviation_features` as the offline pass runs on a chunk of full predictions: row by row, every Δ is
    the same float32 (computed in float64, rounded once), ranks beyond the cap, UNK observations and unknown
    field codes included."""
    monkeypatch.setattr(deviation, "RANK_CAP", 16)  # V = 300 > the cap: the compact form keeps the top 16
    rng = np.random.default_rng(0)
    members, onehots, heads, h, w, bias, obs, obs_codes = _random_case(rng, 300, 8, 60)
    wt = w.t().contiguous()
    batched = _all(predict(h, wt, bias, onehots, heads), w, bias, obs, obs_codes, members, heads)
    assert (batched["rank"] == 17).any() and (batched["rank"] < 17).any()
    assert (batched["head_rank_a"] == 17).any() and (batched["head_rank_a"] < 17).any()
    widths = PackedWidths.of(300, {1: 7}, heads.sizes)
    for i in range(len(obs)):
        full = predict(h[i:i + 1], wt, bias, onehots, heads)
        packed = full.compact().pack()
        assert packed.shape == (1, widths.total) == (1, 2 + 16 + 7 + 2 + 16 + 4)
        stored = Prediction.unpack(packed, h[i:i + 1], widths)
        for pred in (full, stored):
            one = _all(pred, w, bias, obs[i:i + 1], obs_codes[i:i + 1], members, heads)
            assert list(one) == list(batched)
            for k, val in one.items():
                assert torch.equal(val, batched[k][i:i + 1]) or (val.isnan().all() and batched[k][i].isnan()), k
    with pytest.raises(ValueError, match="packed prediction"):
        Prediction.unpack(packed[:, :-1], h[:1], widths)


def test_a_certain_prediction_has_surprisal_exactly_zero():
    """A mass equal to 1 up to float64 error gives a surprisal of exactly 0 (not ±1e-16 by summation order)."""
    pred, w, b, _ = features(torch.tensor([[1.0 - 2e-16, 1e-17, 1e-17]], dtype=torch.float64), 1)
    assert deviation_features(pred, w, b, torch.tensor([0]), no_fields(1), [], [])["surprisal"].item() == 0.0
    tail = upper_tail_surprisal(torch.tensor([[0.0, 0.6, 0.4 + 1e-16]], dtype=torch.float64), torch.tensor([1]))
    assert tail.item() == 0.0


def test_upper_tail_surprisal_is_one_sided():
    codes = np.array([1, 2, 3, 3])  # an ordered field: bucket 1 < 2 < 3 (code 0 = the field's UNK)
    onehot = field_onehot(codes, size=4)
    marg = field_marginal(rows(P.float(), 4), onehot)
    assert marg[0].tolist() == pytest.approx([0.0, 0.5, 0.25, 0.25])
    t = upper_tail_surprisal(marg, torch.tensor([1, 2, 3, 0]))
    # P(>= 1) = 1, P(>= 2) = 0.5, P(>= 3) = 0.25: the highest bucket is the most surprising
    assert t[:3].tolist() == pytest.approx([0.0, math.log(2), math.log(4)], abs=1e-6)
    assert math.isnan(t[3])


def test_field_head_surprisal_and_rank_by_hand():
    # one head with logits log p (h = 1, weight 0): code 0 is the field's UNK, never a candidate
    logp = torch.log(torch.tensor([0.01, 0.5, 0.29, 0.2], dtype=torch.float64))
    heads = Heads.of([(torch.zeros(4, 1, dtype=torch.float64), logp)])
    pred = predict(torch.ones(4, 1), torch.zeros(1, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                   None, heads)
    f = head_features(pred, heads, torch.tensor([[1], [2], [3], [0]]), ["hour"])
    s, r = f["head_surprisal_hour"], f["head_rank_hour"]
    assert s[:3].tolist() == pytest.approx([math.log(2), -math.log(0.29), -math.log(0.2)], rel=1e-6)
    assert r[:3].tolist() == [1.0, 2.0, 3.0] and math.isnan(s[3]) and math.isnan(r[3])


def test_field_heads_ride_on_the_prediction():
    rng = np.random.default_rng(1)
    d = 5
    heads = Heads.of([(torch.tensor(rng.normal(size=(c, d))), torch.tensor(rng.normal(size=c))) for c in (4, 7)])
    h = torch.tensor(rng.normal(size=(3, d)), dtype=torch.float32)
    w = torch.tensor(rng.normal(size=(6, d)), dtype=torch.float64)
    pred = predict(h, w.t().contiguous(), torch.zeros(6, dtype=torch.float64), None, heads)
    ref = torch.log_softmax(h.double() @ heads.each[1][0].t() + heads.each[1][1], 1)
    f = head_features(pred, heads, torch.tensor([[1, 6], [2, 0], [3, 3]]), ["merchant", "hour"])
    assert list(f) == ["head_surprisal_merchant", "head_rank_merchant", "head_surprisal_hour", "head_rank_hour"]
    assert f["head_surprisal_hour"][0].item() == pytest.approx(-ref[0, 6].item(), rel=1e-6)
    assert math.isnan(f["head_rank_hour"][1])
    assert pred.row(2).head_scores[0].shape == (1, 3)  # codes 1..3
