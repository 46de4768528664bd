"""The copy head, the per-field heads and `personal`: causal, distributions, history beyond the window."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_models import BASE, INFO, V, make_batch

from pantherseq.data.batch import seen_before
from pantherseq.model import ModelConfig, build_model
from pantherseq.model.base import PAD
from pantherseq.model.heads import distance_buckets

MODELS = ["panther", "transformer", "sasrec", "hstu"]


def with_history(batch, h: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(4, V, (batch.tokens.shape[0], h), generator=g)
    hist[0, :3] = PAD  # a user with a shorter history: PAD on the left
    target_codes = torch.cat([batch.codes[:, 1:], torch.zeros_like(batch.codes[:, :1])], dim=1)
    return dataclasses.replace(batch, history=hist, target_codes=target_codes)


def copy_model(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model(name, dataclasses.replace(BASE, copy_head=True, field_heads=True, history=6, **kw), INFO).eval()


@pytest.mark.parametrize("name", MODELS)
def test_the_mixture_is_a_distribution(name):
    m = copy_model(name)
    batch = with_history(make_batch(lengths=(12, 7, 12, 3)))
    with torch.no_grad():
        s = m.scores(batch)  # (B, T, V) log-probabilities
        scores, targets = m.target_scores(batch)
    real = batch.tokens != PAD
    torch.testing.assert_close(s.exp().sum(-1)[real], torch.ones(int(real.sum())), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.exp().sum(-1), torch.ones(len(targets)), atol=1e-5, rtol=0)
    assert (s.exp() >= 0).all()


@pytest.mark.parametrize("name", MODELS)
def test_the_copy_head_is_causal(name):
    """Changing events after t (window and targets) leaves the mixture at every position <= t unchanged."""
    m = copy_model(name)
    batch = with_history(make_batch())
    with torch.no_grad():
        base = m.scores(batch)
        for t in (0, 4, 9):
            changed = batch.tokens.clone()
            changed[:, t + 1:] = torch.randint(4, V, changed[:, t + 1:].shape)
            other = m.scores(dataclasses.replace(batch, tokens=changed))
            torch.testing.assert_close(other[:, :t + 1], base[:, :t + 1], atol=1e-5, rtol=1e-5)


def test_history_beyond_the_window_is_reachable():
    """A token that occurs only in the history (before the window) gets pointer mass; without the history
    it gets none."""
    m = copy_model("transformer")
    batch = make_batch()
    only_in_history = 3 + V - 4  # the largest id; make sure the window never holds it
    batch.tokens[batch.tokens == only_in_history] = 5
    hist = torch.full((batch.tokens.shape[0], 6), PAD)
    hist[:, -1] = only_in_history
    keys, a, g = m.copy(m.hidden(batch), batch.tokens, hist, m.token_emb)
    mass = (a * (keys == only_in_history).unsqueeze(1)).sum(-1)
    assert (mass > 0).all() and (g > 0).all()
    keys0, a0, _ = m.copy(m.hidden(batch), batch.tokens, None, m.token_emb)
    assert ((a0 * (keys0 == only_in_history).unsqueeze(1)).sum(-1) == 0).all()


def test_a_first_event_has_no_key_and_gate_zero():
    m = copy_model("transformer")
    batch = make_batch()
    _, a, g = m.copy(m.hidden(batch), batch.tokens, None, m.token_emb)
    assert (g[:, 0] > 0).all()  # position 0 sees its own input token
    empty = torch.full_like(batch.tokens, PAD)
    empty[:, 0] = 1  # UNK is never a key
    _, a, g = m.copy(m.hidden(batch), empty, None, m.token_emb)
    assert (g == 0).all() and (a == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["full", "chunked", "sampled"])
def test_copy_and_field_losses_train(loss):
    m = copy_model("panther", loss=loss, n_negatives=16).train()
    batch = with_history(make_batch())
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        total, parts = m.loss(batch)
        opt.zero_grad()
        total.backward()
        opt.step()
        first = first if first is not None else (float(total.detach()), parts)
    assert "fields" in parts and np.isfinite(float(total.detach())) and float(total.detach()) < first[0]


def test_field_heads_give_normalised_per_field_log_probs_and_learn_from_unk_tokens():
    m = copy_model("transformer")
    batch = with_history(make_batch())
    h = m.hidden(batch)
    logp = m.field_log_probs(h)
    assert [x.shape[-1] for x in logp] == INFO.field_sizes
    for x in logp:
        torch.testing.assert_close(x.exp().sum(-1), torch.ones(x.shape[:-1]), atol=1e-5, rtol=0)
    unk_targets = dataclasses.replace(batch, targets=torch.zeros_like(batch.targets))  # every token target UNK/PAD
    loss, _ = m.field_heads.loss(h, unk_targets.target_codes)
    assert loss > 0  # the per-field targets are still there


def test_personal_is_the_users_own_frequency_with_popularity_ties():
    cfg = dataclasses.replace(ModelConfig(), history=4)
    m = build_model("personal", cfg, INFO)
    m.counts[10] = 5.0  # training popularity: 10 > 11 > the rest
    m.counts[11] = 3.0
    tokens = torch.tensor([[20, 21, 20, 0]])
    hist = torch.tensor([[0, 21, 21, 30]])  # the events before the window (PAD = none)
    batch = dataclasses.replace(make_batch(lengths=(3,), t=4), tokens=tokens, history=hist,
                                targets=torch.tensor([[21, 20, 22, 0]]))
    s, _ = m.target_scores(batch)  # 3 positions with a target
    got = [{v: round(float(s[i, v])) for v in (20, 21, 30)} for i in range(3)]
    assert got == [{20: 1, 21: 2, 30: 1}, {20: 1, 21: 3, 30: 1}, {20: 2, 21: 3, 30: 1}]
    assert s[0, 10] > s[0, 11] > s[0, 12] == 0 and s[0, 10] < 1e-5  # ties by popularity, far below one event


def test_personal_decay_prefers_recent_events():
    cfg = dataclasses.replace(ModelConfig(), history=0, personal_decay=0.5)
    m = build_model("personal", cfg, INFO)
    batch = dataclasses.replace(make_batch(lengths=(3,), t=3), tokens=torch.tensor([[7, 7, 9]]),
                                targets=torch.tensor([[8, 8, 8]]))
    scores, _ = m.target_scores(batch)
    assert scores[2, 9] == pytest.approx(1.0, abs=1e-5) and scores[2, 7] == pytest.approx(0.5 + 0.25, abs=1e-5)


def test_seen_before_marks_repeats_within_a_user_only():
    tokens = np.array([5, 6, 5, 7, 5, 6, 6])
    offsets = np.array([0, 4, 7])  # user 0: 5 6 5 7, user 1: 5 6 6
    assert seen_before(tokens, offsets).tolist() == [False, False, True, False, False, False, True]


def test_distance_buckets():
    assert distance_buckets(torch.tensor([0, 1, 2, 3, 4, 7, 8, 10**9])).tolist() == [0, 1, 1, 2, 2, 3, 3, 15]
