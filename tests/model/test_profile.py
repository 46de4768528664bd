"""Profile encoder and the contrastive loss (paper §3.4, SPEC Eq. 5)."""

from __future__ import annotations

import math

import torch

from pantherseq.model.base import Batch, DataInfo, ModelConfig
from pantherseq.model.profile import ProfileEncoder, contrastive_loss, contrastive_loss_reference, has_profile


def random_positives(B: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(B, B, generator=g) < 0.4
    p = p | p.t()
    p.fill_diagonal_(False)
    return p


def test_contrastive_loss_equals_the_loop_reference():
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        e = torch.randn(6, 5, generator=g, dtype=torch.float64)
        pos = random_positives(6, seed)
        assert pos.any()
        for tau in (0.5, 1.0, 3.0):
            torch.testing.assert_close(contrastive_loss(e, pos, tau), contrastive_loss_reference(e, pos, tau))


def test_contrastive_loss_by_hand():
    # three users on a line at 0, 1, 3; one positive pair (0, 1), tau = 1:
    # -log( e^-1 / (e^-1 + e^-9) ) = log(1 + e^-8)
    e = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    pos = torch.zeros(3, 3, dtype=torch.bool)
    pos[0, 1] = True
    assert math.isclose(float(contrastive_loss(e, pos, 1.0)), math.log1p(math.exp(-8)), rel_tol=1e-12)


def test_no_positive_pair_gives_zero_and_keeps_the_graph():
    e = torch.randn(4, 3, requires_grad=True)
    loss = contrastive_loss(e, torch.eye(4, dtype=torch.bool), 1.0)  # the diagonal never counts
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert e.grad is not None and torch.equal(e.grad, torch.zeros_like(e))


def test_gradient_pulls_positive_pairs_together():
    torch.manual_seed(0)
    e = torch.randn(6, 4, requires_grad=True)
    pos = random_positives(6, 1)
    opt = torch.optim.SGD([e], lr=0.1)
    first = float(contrastive_loss(e, pos, 1.0).detach())
    for _ in range(50):
        opt.zero_grad()
        contrastive_loss(e, pos, 1.0).backward()
        opt.step()
    assert float(contrastive_loss(e, pos, 1.0).detach()) < 0.5 * first


def make_profile_batch(B: int, cat: list[int], n_num: int) -> Batch:
    z = torch.zeros(B, 2, dtype=torch.long)
    profile_cat = torch.stack([torch.arange(B) % n for n in cat], 1) if cat else torch.zeros(B, 0).long()
    return Batch(tokens=z, targets=z, codes=torch.zeros(B, 2, 1, dtype=torch.long), gap_bucket=z,
                 profile_cat=profile_cat,
                 profile_num=torch.randn(B, n_num), positives=torch.zeros(B, B, dtype=torch.bool),
                 users=torch.arange(B))


def test_profile_encoder_shapes_for_each_kind_of_profile():
    cfg = ModelConfig(d_model=8)
    for cat, n_num in (([4, 3], 2), ([4], 0), ([], 3)):
        info = DataInfo(vocab_size=10, profile_cat_sizes=cat, profile_num=n_num)
        assert has_profile(info)
        e = ProfileEncoder(cfg, info)(make_profile_batch(5, cat, n_num))
        assert e.shape == (5, 8) and torch.isfinite(e).all()
    assert not has_profile(DataInfo(vocab_size=10))
