"""Count baselines against values worked out by hand."""

from __future__ import annotations

import math

import torch

from pantherseq.model.base import Batch, DataInfo, ModelConfig
from pantherseq.model.counts import Markov, Popular


def batch(tokens, targets) -> Batch:
    t = torch.tensor(tokens)
    y = torch.tensor(targets)
    B, T = t.shape
    return Batch(tokens=t, targets=y, codes=torch.zeros(B, T, 0, dtype=torch.long),
                 gap_bucket=torch.zeros(B, T, dtype=torch.long), profile_cat=torch.zeros(B, 0, dtype=torch.long),
                 profile_num=torch.zeros(B, 0), positives=torch.zeros(B, B, dtype=torch.bool),
                 users=torch.arange(B))


def test_markov_by_hand():
    # vocabulary 4 specials + tokens 4, 5, 6; transitions 4->5 twice, 4->6 once, 5->4 once
    info = DataInfo(vocab_size=7)
    m = Markov(ModelConfig(markov_backoff=1.0), info)
    m.observe(batch([[4, 5, 4, 5], [4, 6, 0, 0]], [[5, 4, 5, 0], [6, 0, 0, 0]]))
    m.finish()
    s = m._from_current(torch.tensor([4, 5, 6]))
    prior = {4: 1 / 4, 5: 2 / 4, 6: 1 / 4}  # targets: 5, 4, 5, 6
    # from 4: counts 5:2, 6:1, total 3 -> P(5) = (2 + 0.5) / 4
    assert math.isclose(s[0, 5].exp().item(), (2 + prior[5]) / 4, rel_tol=1e-6)
    assert math.isclose(s[0, 6].exp().item(), (1 + prior[6]) / 4, rel_tol=1e-6)
    assert math.isclose(s[0, 4].exp().item(), prior[4] / 4, rel_tol=1e-6)
    # from 6: never seen -> the popularity prior
    assert math.isclose(s[2, 5].exp().item(), prior[5], rel_tol=1e-6)
    # the state_dict carries the counts
    again = Markov(ModelConfig(), info)
    again.load_state_dict(m.state_dict())
    assert torch.equal(again._from_current(torch.tensor([4, 5, 6])), s)


def test_popular_ranks_by_frequency():
    p = Popular(ModelConfig(), DataInfo(vocab_size=7))
    p.observe(batch([[4, 5, 4]], [[5, 5, 6]]))
    s = p._from_current(torch.tensor([4]))[0]
    assert s[5] > s[6] > s[4]
