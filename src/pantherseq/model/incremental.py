"""Appending events to a window without recomputing it: the causal forward of the attention backbones
(PANTHER, its Transformer baseline, SASRec) over new positions only, reading what earlier ones left behind.

A `WindowCache` holds, for windows of events that start at position 0, what later positions read of the
earlier ones: per block the attention keys and values of every position (B, nh, P, hs), and the last
`front` rows of the block's normalised input (B, <= front, D), the rows SPRM's causal dilated convolutions
reach back to (front = max (w − 1)·r: 8 for the default kernels; none without SPRM); and `n`, the events
in the window. `extend(model, batch, cache)` runs the batch's events through the same modules as
`model.hidden` — `InputEmbedding` at positions n.., `CausalSelfAttention.extend` (the new queries against
the cached keys and values), SPRM on the cached rows followed by the new ones, the MLP, the final LayerNorm
— and returns their causal states and the cache of the longer window. With no cache it is `model.hidden`
of the (right-padded) windows themselves, keys and values kept: `cut` then takes one window's cache out
of the batch. So a window's states are the same, to float rounding, however it is cut into appends
(tests/model/test_incremental.py: 1e-9 in float64 across appends of 1..k events, every profile mode).

Positions are absolute (a learned embedding per position), so a window can only grow: dropping its first
event would change every later position's input. The service therefore re-bases a window with a fresh
`extend` (serve/windows.py). HSTU (a relative position bias, no softmax) is not covered: `supports` says
which models are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pantherseq.model.base import Batch, NeuralModel
from pantherseq.model.layers import Block, padding_mask
from pantherseq.model.panther import Panther
from pantherseq.model.sasrec import SASRec
from pantherseq.model.sprm import SPRM


@dataclass
class LayerCache:
    """One block's part of a window: keys and values (B, nh, P, hs), the last normalised inputs (B, <=front, D)."""

    k: torch.Tensor
    v: torch.Tensor
    tail: torch.Tensor


@dataclass
class WindowCache:
    """What appending to a window reads (see the module doc); `n` events, not counting a profile position;
    `fronts` the rows of normalised input each block keeps (`reach`)."""

    layers: list[LayerCache]
    n: int
    fronts: list[int]

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for lc in self.layers for t in (lc.k, lc.v, lc.tail))

    def cut(self, row: int, n: int, prefix: int = 0) -> WindowCache:
        """Window `row` of a batched cache, its first `n` events (+ `prefix` profile positions), as a (1, ...)
        cache of its own (copies: the batch's tensors can be freed)."""
        p = prefix + n
        return WindowCache([LayerCache(lc.k[row:row + 1, :, :p].clone(), lc.v[row:row + 1, :, :p].clone(),
                                       _last_rows(lc.tail[row:row + 1, :p], f).clone())
                            for lc, f in zip(self.layers, self.fronts)], n, self.fronts)


def supports(model: NeuralModel) -> bool:
    """Whether `extend` computes this model's states (its blocks are `Block`s whose parallel module, if any, is
    SPRM)."""
    if not isinstance(model, (Panther, SASRec)):
        return False
    return all(isinstance(b, Block) and (b.parallel is None or isinstance(b.parallel, SPRM)) for b in model.blocks)


def reach(block: Block) -> int:
    """How many earlier normalised inputs the block's parallel module reads (SPRM's longest tap shift)."""
    p = block.parallel
    return max((w - 1) * r for w, r in p.kernels) if isinstance(p, SPRM) else 0


def _last_rows(rows: torch.Tensor, front: int) -> torch.Tensor:
    """rows (B, T, D) -> its last min(T, front) rows."""
    return rows[:, rows.shape[1] - min(front, rows.shape[1]):]


def _block_extend(block: Block, x: torch.Tensor, past: LayerCache) -> tuple[torch.Tensor, LayerCache]:
    """`Block.forward` for T new positions after the cached ones: x (B, T, D) -> (B, T, D) and the block's
    cache (its `tail`: every cached and new normalised input, trimmed by the caller)."""
    h = block.ln_1(x)
    y, k, v = block.attn.extend(h, past.k, past.v)
    out = x + y
    rows = torch.cat([past.tail, h], dim=1)  # (B, cached + T, D): SPRM's taps read back at most `reach` rows
    if block.parallel is not None:
        out = out + block.parallel(rows)[:, -x.shape[1]:]
    out = out + block.mlp(block.ln_2(out))
    return out, LayerCache(k, v, rows)


def extend(model: NeuralModel, batch: Batch, cache: WindowCache | None = None
           ) -> tuple[torch.Tensor, WindowCache]:
    """The causal states (B, T, D) of the batch's events appended to the cached window (no cache: windows of
    their own, right-padded as `model.hidden` takes them), and the cache after them (with no cache, of the
    whole padded batch: `WindowCache.cut` takes each window's). A cache is of one window (B = 1) and the batch
    then holds its next events, no padding. The profile is the batch's (`positional`: added to the new
    events; `first_token`: its position is made when there is no cache)."""
    mode = getattr(model, "profile_mode", "none")
    encoder = getattr(model, "profile", None)
    e_u = encoder(batch) if encoder is not None else None  # (B, D)
    start = 0 if cache is None else cache.n
    x = model.embedding(batch, model.token_emb, e_u if mode == "positional" else None, start=start)  # (B, T, D)
    keep = padding_mask(batch).to(x.dtype) if isinstance(model, SASRec) else None  # SASRec zeroes padding
    if keep is not None:
        x = x * keep
    prefix = mode == "first_token" and cache is None
    if prefix:
        x = torch.cat([e_u.unsqueeze(1), x], dim=1)  # (B, 1 + T, D)
    fronts = [reach(b) for b in model.blocks]
    layers = []
    for i, block in enumerate(model.blocks):
        x, lc = _block_extend(block, x, cache.layers[i] if cache is not None else _empty(block, x))
        if keep is not None:
            x = x * keep
        if cache is not None:  # one window: keep only the rows later positions read
            lc = LayerCache(lc.k, lc.v, _last_rows(lc.tail, fronts[i]))
        layers.append(lc)
    x = model.ln_f(x)
    return (x[:, 1:] if prefix else x), WindowCache(layers, start + batch.tokens.shape[1], fronts)


def _empty(block: Block, x: torch.Tensor) -> LayerCache:
    B, _, D = x.shape
    z = x.new_zeros(B, block.attn.n_heads, 0, D // block.attn.n_heads)
    return LayerCache(z, z, x.new_zeros(B, 0, D))


__all__ = ["LayerCache", "WindowCache", "extend", "reach", "supports"]
