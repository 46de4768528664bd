"""Properties every neural model must have: causal, padding-safe, trainable, exactly reloadable."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pantherseq.model import MODELS, Batch, DataInfo, ModelConfig, build_model
from pantherseq.model.base import PAD, NeuralModel, chunked_cross_entropy
from pantherseq.model.panther import Panther, Transformer

V, B, T, D, M = 50, 4, 12, 32, 8
INFO = DataInfo(vocab_size=V, field_sizes=[6, 5, 7], profile_cat_sizes=[5, 3], profile_num=2)
BASE = ModelConfig(d_model=D, n_layers=2, n_heads=2, max_len=16, dropout=0.0, n_prototypes=M, loss="full",
                   field_embeddings=True, time_gap=True)

# name -> (registry model, config overrides)
VARIANTS = {
    "panther": ("panther", {}),
    "panther-sprm-only": ("panther", {"profile_mode": "none", "field_embeddings": False, "time_gap": False}),
    "panther-positional": ("panther", {"profile_mode": "positional", "contrastive_lambda": 0.0}),
    "panther-first_token": ("panther", {"profile_mode": "first_token", "contrastive_lambda": 0.0}),
    "panther-first_token-cl": ("panther", {"profile_mode": "first_token", "contrastive_lambda": 0.1}),
    "panther-history-cl": ("panther", {"contrastive_on": "history", "contrastive_lambda": 0.1}),
    "panther-self-cl": ("panther", {"profile_mode": "none", "contrastive_on": "self", "contrastive_lambda": 0.1}),
    "panther-copy-fields": ("panther", {"copy_head": True, "field_heads": True}),
    "panther-plain-inputs": ("panther", {"field_embeddings": False, "time_gap": False}),
    "transformer": ("transformer", {}),
    "sasrec": ("sasrec", {}),
    "hstu": ("hstu", {}),
}


def make_batch(lengths: tuple[int, ...] = (12, 12, 12, 12), seed: int = 0, t: int = T) -> Batch:
    """Right-padded random events; targets are the next event, PAD after a row's last event."""
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    ids = torch.arange(t).unsqueeze(0)
    real = ids < torch.tensor(lengths).unsqueeze(1)  # (B, T)
    tokens = torch.randint(4, V, (n, t), generator=g).masked_fill(~real, PAD)
    targets = torch.cat([tokens[:, 1:], torch.full((n, 1), PAD)], dim=1)
    codes = torch.stack([torch.randint(1, s, (n, t), generator=g) for s in INFO.field_sizes], dim=2)
    codes = codes.masked_fill(~real.unsqueeze(-1), 0)
    gap = torch.randint(1, 16, (n, t), generator=g).masked_fill(~real, 0)
    gap[:, 0] = 0
    positives = torch.zeros(n, n, dtype=torch.bool)
    for i in range(0, n - 1, 2):
        positives[i, i + 1] = positives[i + 1, i] = True
    return Batch(tokens=tokens, targets=targets, codes=codes, gap_bucket=gap,
                 profile_cat=torch.stack([torch.randint(0, s, (n,), generator=g)
                                          for s in INFO.profile_cat_sizes], 1),
                 profile_num=torch.randn(n, INFO.profile_num, generator=g), positives=positives,
                 users=torch.arange(n))


def build(variant: str, seed: int = 0, info: DataInfo = INFO, **overrides) -> NeuralModel:
    name, kw = VARIANTS[variant]
    torch.manual_seed(seed)
    return build_model(name, dataclasses.replace(BASE, **{**kw, **overrides}), info)


def change_event(batch: Batch, t: int) -> Batch:
    """A copy of `batch` whose event at t (token, codes, gap) differs everywhere."""
    b = dataclasses.replace(batch, tokens=batch.tokens.clone(), codes=batch.codes.clone(),
                            gap_bucket=batch.gap_bucket.clone())
    b.tokens[:, t] = 4 + (b.tokens[:, t] - 4 + 7) % (V - 4)
    for f, s in enumerate(INFO.field_sizes):
        b.codes[:, t, f] = 1 + b.codes[:, t, f] % (s - 1)
    b.gap_bucket[:, t] = 1 + b.gap_bucket[:, t] % 15
    return b


# -- causality ----------------------------------------------------------------------------------

CAUSAL_CASES = [v for v in VARIANTS] + [n for n in MODELS if n not in {k for k, _ in VARIANTS.values()}]


@pytest.mark.parametrize("case", CAUSAL_CASES)
def test_changing_event_t_plus_1_leaves_outputs_up_to_t_unchanged(case):
    batch = make_batch()
    if case in VARIANTS:
        model = build(case).eval()
    else:  # a registry model this file has no variant for (e.g. count models)
        model = MODELS[case](BASE, INFO).eval()
    if not model.trainable:
        model.observe(batch)
    with torch.no_grad():
        s0 = model.scores(batch)
        h0 = model.hidden(batch) if isinstance(model, NeuralModel) else None
        for t in range(T - 1):
            b = change_event(batch, t + 1)
            s1 = model.scores(b)
            torch.testing.assert_close(s1[:, :t + 1], s0[:, :t + 1], atol=1e-6, rtol=0)
            if h0 is not None:
                assert not torch.allclose(s1[:, t + 1], s0[:, t + 1]), "the changed event should matter"
                torch.testing.assert_close(model.hidden(b)[:, :t + 1], h0[:, :t + 1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["positional", "first_token"])
def test_profile_reaches_the_first_event(mode):
    model = build("panther", profile_mode=mode).eval()
    batch = make_batch()
    other = dataclasses.replace(batch, profile_num=batch.profile_num + 1.0)
    with torch.no_grad():
        assert not torch.allclose(model.hidden(batch)[:, 0], model.hidden(other)[:, 0])


def test_profile_mode_none_ignores_profile_and_no_profile_data_is_silent():
    batch = make_batch()
    other = dataclasses.replace(batch, profile_num=batch.profile_num + 1.0)
    model = build("panther", profile_mode="none").eval()
    with torch.no_grad():
        torch.testing.assert_close(model.hidden(batch), model.hidden(other), atol=0, rtol=0)
    bare = build("panther", info=DataInfo(vocab_size=V, field_sizes=INFO.field_sizes))
    assert bare.profile is None and bare.extra_loss(batch, bare.hidden(batch)) == (None, {})
    assert torch.isfinite(bare.loss(batch)[0])


# -- padding --------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padding_does_not_leak_and_nothing_is_nan(variant):
    model = build(variant).eval()
    lengths = (12, 7, 1, 0)
    batch = make_batch(lengths)
    real = batch.mask
    g = torch.Generator().manual_seed(1)
    noisy = dataclasses.replace(  # garbage codes / gaps in the padded slots
        batch,
        codes=torch.where(real.unsqueeze(-1), batch.codes,
                          torch.randint(1, 5, batch.codes.shape, generator=g)),
        gap_bucket=torch.where(real, batch.gap_bucket, torch.randint(1, 16, real.shape, generator=g)))
    more = 16 - T  # the same events followed by more padding
    longer = dataclasses.replace(batch, codes=F.pad(batch.codes, (0, 0, 0, more)),
                                 **{k: F.pad(getattr(batch, k), (0, more))
                                    for k in ("tokens", "targets", "gap_bucket")})
    with torch.no_grad():
        h = model.hidden(batch)
        assert torch.isfinite(h).all() and torch.isfinite(model.scores(batch)).all()
        assert torch.isfinite(model.loss(batch)[0])
        torch.testing.assert_close(model.hidden(noisy)[real], h[real], atol=1e-6, rtol=0)
        torch.testing.assert_close(model.hidden(longer)[:, :T][real], h[real], atol=1e-5, rtol=0)


def test_longer_than_max_len_is_an_error():
    with pytest.raises(ValueError, match="max_len"):
        build("panther").hidden(make_batch(t=17, lengths=(17,) * B))


# -- training -------------------------------------------------------------------------------------

def train(model: NeuralModel, batch: Batch, steps: int, lr: float = 3e-3) -> list[float]:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    losses = []
    model.train()
    for _ in range(steps):
        loss, _ = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_overfits_a_tiny_batch(variant):
    losses = train(build(variant), make_batch((12, 10, 8, 12)), steps=60)
    assert all(math.isfinite(x) for x in losses), "non-finite loss"
    assert losses[-1] < 0.3 * losses[0], f"{variant}: {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_contrastive_term_is_reported_and_mixed():
    model = build("panther", contrastive_lambda=0.25)
    batch = make_batch()
    total, parts = model.loss(batch)
    assert set(parts) == {"gen", "cl"}
    expected = 0.75 * parts["gen"] + 0.25 * parts["cl"]
    torch.testing.assert_close(float(total.detach()), expected, atol=1e-5, rtol=1e-5)
    assert build("transformer").extra_loss(batch, None) == (None, {})


def test_the_self_contrastive_term_needs_no_profile_and_asks_for_views():
    batch = make_batch()
    self_cl = build("panther-self-cl")
    assert self_cl.profile is None and self_cl.view_min == BASE.contrastive_view_min
    _, parts = self_cl.loss(batch)
    assert set(parts) >= {"gen", "cl"} and math.isfinite(parts["cl"])
    # the profile's terms stay silent without a profile, and ask for no views
    for on in ("profile", "history"):
        m = build("panther", profile_mode="none", contrastive_on=on, contrastive_lambda=0.1)
        assert m.view_min == 0 and m.extra_loss(batch, m.hidden(batch)) == (None, {})
    assert build("panther-self-cl", contrastive_lambda=0.0).view_min == 0
    assert build("transformer", contrastive_on="self", contrastive_lambda=0.1).view_min == 0


def test_input_fields_choose_the_fields_a_model_reads():
    from pantherseq.errors import ConfigError

    info = dataclasses.replace(INFO, field_names=["item", "hour", "weekday"])
    batch = make_batch()
    model = build("panther", info=info, input_fields=["item"], time_gap=False, profile_mode="none").eval()
    moved = dataclasses.replace(batch, codes=batch.codes.clone())
    moved.codes[..., 1:] = 1 + moved.codes[..., 1:] % 4  # hour and weekday differ everywhere
    with torch.no_grad():
        assert torch.equal(model.hidden(batch), model.hidden(moved))
        moved.codes[..., 0] = 1 + moved.codes[..., 0] % 5  # now the item's code too
        assert not torch.allclose(model.hidden(batch), model.hidden(moved))
    with pytest.raises(ConfigError, match="'minute' is not an event field of this run; its fields: item, hour"):
        build("panther", info=info, input_fields=["item", "minute"])


def test_chunked_loss_equals_full():
    model = build("panther").eval()
    batch = make_batch((12, 10, 8, 12))
    with torch.no_grad():
        full = model.loss(batch)[0]
        model.cfg.loss = "chunked"
        chunked = model.loss(batch)[0]
        h = model.hidden(batch)[batch.targets != PAD]
        y = batch.targets[batch.targets != PAD]
        small_chunks = chunked_cross_entropy(h, y, model.output_weight, model.out_bias, chunk=5)
        direct = F.cross_entropy(model.logits(h), y)
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(small_chunks, direct, atol=1e-6, rtol=1e-6)


def test_sampled_loss_is_finite_and_decreases():
    model = build("panther", loss="sampled", n_negatives=16)
    losses = train(model, make_batch((12, 10, 8, 12)), steps=60)
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, f"{first:.3f} -> {last:.3f}"


# -- state, prototypes, registry ---------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_round_trip_is_exact(variant):
    batch = make_batch((12, 7, 3, 12))
    a = build(variant, seed=0)
    train(a, batch, steps=3)
    b = build(variant, seed=1)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a.scores(batch), b.scores(batch))


@pytest.mark.parametrize("mode", ["positional", "first_token", "none"])
def test_prototype_attention_rows_are_distributions(mode):
    model = build("panther", profile_mode=mode).eval()
    assert model.prototype_attention() is None  # nothing before a forward
    with torch.no_grad():
        model.hidden(make_batch())
    att = model.prototype_attention()
    assert att.shape == (B, T, M)
    torch.testing.assert_close(att.sum(-1), torch.ones(B, T))


def test_transformer_has_no_sprm_nor_profile():
    model = build("transformer")
    assert isinstance(model, Panther) and isinstance(model, Transformer)
    assert model.profile is None and all(b.parallel is None for b in model.blocks)
    model.hidden(make_batch())
    assert model.prototype_attention() is None


def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="panther.*") as err:
        build_model("gpt5", BASE, INFO)
    assert all(name in str(err.value) for name in MODELS)


def test_unknown_profile_mode_is_an_error():
    with pytest.raises(ValueError, match="profile_mode"):
        Panther(dataclasses.replace(BASE, profile_mode="last_token"), INFO)
