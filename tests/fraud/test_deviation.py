"""Each deviation feature Δ on hand-made distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pantherseq.fraud.deviation import (
    Prediction,
    collision_entropy,
    deviation_features,
    embedding_distance,
    expected_embedding,
    field_marginal,
    field_mass,
    field_members,
    field_onehot,
    field_surprisal,
    head_features,
    head_rank,
    head_surprisal,
    predict,
    rank_of,
    stack_heads,
    standardised_deviation,
    surprisal,
    upper_tail_surprisal,
)

P = torch.tensor([[0.5, 0.25, 0.125, 0.125]])


def rows(p: torch.Tensor, n: int) -> torch.Tensor:
    return p.expand(n, -1)


def test_surprisal_is_minus_log_p():
    s = surprisal(rows(P, 4), torch.tensor([0, 1, 2, -1]))
    assert s[:3].tolist() == pytest.approx([math.log(2), math.log(4), math.log(8)])
    assert math.isnan(s[3])  # UNK observed: undefined


def test_rank_counts_strictly_higher_tokens():
    r = rank_of(torch.log(rows(P, 5)), torch.tensor([0, 1, 2, 3, -1]))
    assert r[:4].tolist() == [1.0, 2.0, 3.0, 3.0]  # the two 0.125 tokens tie: both rank 3
    assert math.isnan(r[4])


def test_standardised_deviation_by_hand():
    # mu = 1/4; E[p^2] = (0.25 + 0.0625 + 2 * 0.015625) / 4 = 0.0859375; sigma^2 = 0.0859375 - 0.0625
    sigma = math.sqrt(0.0859375 - 0.0625)
    d = standardised_deviation(rows(P, 3), torch.tensor([0, 1, 3]))
    assert d.tolist() == pytest.approx([0.25 / sigma, 0.0, -0.125 / sigma], rel=1e-5)
    flat = standardised_deviation(torch.full((1, 4), 0.25), torch.tensor([2]))
    assert flat.tolist() == [0.0]  # a uniform prediction: no deviation, no division by zero


def test_collision_entropy_is_zero_when_certain_and_log_v_when_uniform():
    h = collision_entropy(torch.tensor([[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]]))
    assert h.tolist() == pytest.approx([0.0, math.log(4)], abs=1e-6)


def test_field_surprisal_marginalises_over_tokens_sharing_the_value():
    codes = np.array([1, 1, 2, 3])  # tokens 0 and 1 carry value 1, token 2 value 2, token 3 value 3
    members = field_members(codes, size=5)  # code 4 exists in the field but no token carries it
    obs = torch.tensor([1, 2, 3, 0, 4])
    mass = field_mass(rows(P, 5), obs, members)
    assert mass.tolist() == pytest.approx([0.75, 0.125, 0.125, 0.0, 0.0])
    s = field_surprisal(rows(P, 5), obs, members)
    assert s[:3].tolist() == pytest.approx([-math.log(0.75), math.log(8), math.log(8)])
    assert math.isnan(s[3]) and math.isnan(s[4])  # the field's UNK and an uncarried value


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
    assert expected_embedding(torch.tensor([[0.5, 0.5, 0.0]]), w).tolist() == [[0.5, 1.0]]


def test_deviation_features_agree_with_the_parts():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, dtype=torch.float64)
    h, w = torch.randn(6, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    obs = torch.tensor([0, 1, 2, 3, -1, 2])
    codes = torch.tensor([[1], [1], [2], [3], [2], [0]])
    members = [field_members(np.array([1, 1, 2, 3]), 4)]
    p = torch.softmax(logits, 1)
    f = deviation_features(Prediction.of(h, p, {0: field_onehot(np.array([1, 1, 2, 3]), 4, torch.float64)}), w,
                           obs, codes, members, ["merchant"])
    assert all(v.dtype == torch.float32 for v in f.values())
    assert torch.allclose(f["surprisal"][:4].double(), -torch.log_softmax(logits, 1)[torch.arange(4), obs[:4]],
                          atol=1e-6)
    assert f["is_unk"].tolist() == [0, 0, 0, 0, 1, 0]
    assert math.isnan(f["surprisal"][4]) and not math.isnan(f["surprisal_merchant"][4])  # UNK keeps fields
    assert f["surprisal_merchant"][0] == pytest.approx(-math.log(float(p[0, 0] + p[0, 1])), rel=1e-5)
    assert math.isnan(f["surprisal_merchant"][5])
    assert torch.allclose(f["log_rank"][:4], torch.log(f["rank"][:4]))
    assert f["tail_merchant"][2] == pytest.approx(-math.log(float(p[2, 2] + p[2, 3])), rel=1e-5)


def test_one_event_equals_the_batch_bit_for_bit():
    """The service scores one event with the same `predict` + `deviation_features` as the offline pass runs
    on a chunk of positions: row by row, every Δ is the same float32 (computed in float64, rounded once),
    UNK observations and unknown field codes included."""
    rng = np.random.default_rng(0)
    v, d, n = 300, 8, 50
    codes_a, codes_b = rng.integers(1, 40, v), rng.integers(1, 6, v)
    members = [field_members(codes_a, 41), field_members(codes_b, 7)]
    ordered = {1: field_onehot(codes_b, 7, torch.float64)}
    h = torch.tensor(rng.normal(size=(n, d)), dtype=torch.float32)
    w = torch.tensor(rng.normal(size=(v, d)), dtype=torch.float64)
    bias = torch.tensor(rng.normal(size=v), dtype=torch.float64)
    obs = rng.integers(-1, v, n)
    obs_codes = torch.from_numpy(np.stack([np.where(obs >= 0, codes_a[obs], rng.integers(0, 41, n)),
                                           np.where(obs >= 0, codes_b[obs], rng.integers(0, 7, n))], 1))
    obs = torch.from_numpy(obs)
    wt = w.t().contiguous()
    batched = deviation_features(predict(h, wt, bias, ordered), w, obs, obs_codes, members, ["a", "b"])
    for i in range(n):
        one = deviation_features(predict(h[i:i + 1], wt, bias, ordered), w, obs[i:i + 1], obs_codes[i:i + 1],
                                 members, ["a", "b"])
        assert list(one) == list(batched)
        for k, val in one.items():
            assert torch.equal(val, batched[k][i:i + 1]) or (val.isnan().all() and batched[k][i].isnan()), k


def test_a_certain_prediction_has_surprisal_exactly_zero():
    """A mass equal to 1 up to float64 error gives a surprisal of exactly 0 (not ±1e-16 by summation order)."""
    p = torch.tensor([[1.0 - 2e-16, 1e-17, 1e-17]], dtype=torch.float64)
    assert surprisal(p, torch.tensor([0])).item() == 0.0
    tail = upper_tail_surprisal(torch.tensor([[0.0, 0.6, 0.4 + 1e-16]], dtype=torch.float64), torch.tensor([1]))
    assert tail.item() == 0.0


def test_upper_tail_surprisal_is_one_sided():
    codes = np.array([1, 2, 3, 3])  # an ordered field: bucket 1 < 2 < 3 (code 0 = the field's UNK)
    onehot = field_onehot(codes, size=4)
    marg = field_marginal(rows(P, 4), onehot)
    assert marg[0].tolist() == pytest.approx([0.0, 0.5, 0.25, 0.25])
    t = upper_tail_surprisal(marg, torch.tensor([1, 2, 3, 0]))
    # P(>= 1) = 1, P(>= 2) = 0.5, P(>= 3) = 0.25: the highest bucket is the most surprising
    assert t[:3].tolist() == pytest.approx([0.0, math.log(2), math.log(4)], abs=1e-6)
    assert math.isnan(t[3])


def test_field_head_surprisal_and_rank_by_hand():
    logp = torch.log(torch.tensor([[0.01, 0.5, 0.29, 0.2]] * 4, dtype=torch.float64))  # code 0 = the field's UNK
    s = head_surprisal(logp, torch.tensor([1, 2, 3, 0]))
    assert s[:3].tolist() == pytest.approx([math.log(2), -math.log(0.29), -math.log(0.2)], rel=1e-6)
    assert math.isnan(s[3])
    r = head_rank(logp, torch.tensor([1, 2, 3, 0]))
    assert r[:3].tolist() == [1.0, 2.0, 3.0] and math.isnan(r[3])  # code 0 is never a candidate


def test_field_heads_ride_on_the_prediction():
    rng = np.random.default_rng(1)
    d = 5
    heads = [(torch.tensor(rng.normal(size=(c, d))), torch.tensor(rng.normal(size=c))) for c in (4, 7)]
    h = torch.tensor(rng.normal(size=(3, d)), dtype=torch.float32)
    w = torch.tensor(rng.normal(size=(6, d)), dtype=torch.float64)
    pred = predict(h, w.t().contiguous(), torch.zeros(6, dtype=torch.float64), None, stack_heads(heads))
    ref = torch.log_softmax(h.double() @ heads[1][0].t() + heads[1][1], 1)
    assert torch.allclose(pred.field_logp[1], ref)
    f = head_features(pred, torch.tensor([[1, 6], [2, 0], [3, 3]]), ["merchant", "hour"])
    assert list(f) == ["head_surprisal_merchant", "head_rank_merchant", "head_surprisal_hour", "head_rank_hour"]
    assert f["head_surprisal_hour"][0].item() == pytest.approx(-ref[0, 6].item(), rel=1e-6)
    assert math.isnan(f["head_rank_hour"][1])
    assert pred.row(2).field_logp[0].shape == (1, 4)
