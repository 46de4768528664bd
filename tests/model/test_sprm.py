"""SPRM (paper §3.3): the fast path equals the loop reference, and no position sees the future."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pantherseq.model.base import ModelConfig
from pantherseq.model.sprm import SPRM, causal_taps, reference_sprm

CFG = ModelConfig(d_model=16, n_prototypes=6, dropout=0.0, sprm_kernels=[[3, 1], [3, 2], [2, 4], [1, 1]])


def make_sprm(seed: int = 0, **overrides) -> SPRM:
    torch.manual_seed(seed)
    m = SPRM(dataclasses.replace(CFG, **overrides)).eval()
    with torch.no_grad():  # non-trivial conv biases, so padding-as-zero is really exercised
        for conv in m.convs:
            conv.bias.normal_()
    return m


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 14), seed=st.integers(0, 1000),
       kernels=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 5)), min_size=1, max_size=3))
def test_fast_path_equals_reference(T, seed, kernels):
    m = make_sprm(seed, sprm_kernels=[list(k) for k in kernels])
    h = torch.randn(3, T, CFG.d_model, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        fast = m(h)
        ref, ref_att = reference_sprm(m, h)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.last_attention, ref_att, atol=1e-6, rtol=1e-5)


def test_changing_t_plus_1_leaves_outputs_up_to_t_unchanged():
    m = make_sprm()
    T = 12
    h = torch.randn(2, T, CFG.d_model)
    with torch.no_grad():
        y0 = m(h)
        for t in range(T - 1):
            h1 = h.clone()
            h1[:, t + 1:] += torch.randn_like(h1[:, t + 1:])  # the future changes, everything from t+1 on
            y1 = m(h1)
            torch.testing.assert_close(y1[:, :t + 1], y0[:, :t + 1], atol=0, rtol=0)
            assert not torch.allclose(y1[:, t + 1], y0[:, t + 1])


def test_attention_weights_shape_and_rows():
    m = make_sprm()
    m(torch.randn(4, 9, CFG.d_model))
    att = m.last_attention
    assert att.shape == (4, 9, CFG.n_prototypes) and not att.requires_grad
    torch.testing.assert_close(att.sum(-1), torch.ones(4, 9))


@pytest.mark.parametrize("bad", [[], [[0, 1]], [[3, 0]]])
def test_bad_kernels_are_rejected(bad):
    with pytest.raises(ValueError, match="sprm_kernels"):
        SPRM(dataclasses.replace(CFG, sprm_kernels=bad))


@pytest.mark.parametrize("w, r", [(1, 1), (3, 1), (3, 2), (2, 4), (4, 5)])
def test_causal_taps_equal_the_library_convolution(w, r):
    """The shifted multiply-adds compute what nn.Conv1d with left padding computes (float64: no tolerance
    beyond rounding)."""
    torch.manual_seed(w * 10 + r)
    conv = torch.nn.Conv1d(8, 8, w, dilation=r, groups=8).double()
    h = torch.randn(3, 11, 8, dtype=torch.float64)
    ref = conv(torch.nn.functional.pad(h.transpose(1, 2), ((w - 1) * r, 0))).transpose(1, 2)
    torch.testing.assert_close(causal_taps(h, conv.weight, conv.bias, w, r), ref, atol=1e-12, rtol=1e-12)
