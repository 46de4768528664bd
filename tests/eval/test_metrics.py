"""Metrics against hand-computed values, and the evaluation protocol with an oracle model."""

from __future__ import annotations

import math

import pytest
import torch

from pantherseq.eval.metrics import MetricSum, per_example, ranks


def test_ranks_by_hand():
    # ids 0..3 are special and never candidates; candidates are ids 4..7
    scores = torch.tensor([[9.0, 9, 9, 9, 0.1, 0.5, 0.3, 0.2],   # target 5 is the best -> rank 1
                           [9.0, 9, 9, 9, 0.1, 0.5, 0.3, 0.2],   # target 4 is the worst -> rank 4
                           [0.0, 0, 0, 0, 0.5, 0.5, 0.5, 0.1]])  # ties 4,5,6 count against: 3
    r = ranks(scores, torch.tensor([5, 4, 4]))
    assert r.tolist() == [1, 4, 3]
    # a constant scorer ranks every target last: ties never help
    assert ranks(torch.zeros(2, 8), torch.tensor([4, 7])).tolist() == [4, 4]


def test_per_example_values_by_hand():
    v = per_example(torch.tensor([1, 3, 7, 20]))
    assert v["hr@1"].tolist() == [1, 0, 0, 0]
    assert v["hr@5"].tolist() == [1, 1, 0, 0]
    assert v["hr@10"].tolist() == [1, 1, 1, 0]
    assert v["ndcg@5"].tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])  # 1/log2(4) = 0.5
    assert v["ndcg@10"].tolist() == pytest.approx([1.0, 0.5, 1 / math.log2(8), 0.0])
    assert v["mrr"].tolist() == pytest.approx([1.0, 1 / 3, 1 / 7, 1 / 20])


def test_sum_and_count_aggregation_is_the_mean_over_examples():
    acc = MetricSum()
    acc.add(torch.tensor([1, 3]))
    acc.add(torch.tensor([7]))  # batches of different sizes: the mean is per example, not per batch
    res = acc.result()
    assert res["n"] == 3
    assert res["hr@5"] == pytest.approx(2 / 3) and res["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 7) / 3)
    again = MetricSum.from_tensor(acc.tensor())
    assert again.result() == res
