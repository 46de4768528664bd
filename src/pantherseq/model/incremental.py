"""Appending events to a window without recomputing it: the causal forward of the attention backbones
(PANTHER, its Transformer baseline, SASRec) over new positions only, reading what earlier ones left behind.

A `WindowCache` holds, for one window of events that starts at position 0, what later positions read of
the earlier ones: per block the attention keys and values of every position (1, nh, P, hs), and the last
`front` rows of the block's normalised input (1, <= front, D), the rows SPRM's causal dilated convolutions
reach back to (front = max (w − 1)·r: 8 for the default kernels; none without SPRM); and `n`, the events
in the window. `extend(model, batch, caches)` runs a batch of windows' new events (right-padded) through
the same modules as `model.hidden` — `InputEmbedding` at each window's next positions,
`CausalSelfAttention.extend` (the new queries against the window's cached keys and values, padded to one
length and masked), SPRM on the cached rows followed by the new ones, the MLP, the final LayerNorm — and
returns their causal states and each window's longer cache. With no caches it is `model.hidden` of the
windows themselves, keys and values kept. So a window's states are the same, to float rounding, however it
is cut into appends (tests/model/test_incremental.py: 1e-9 in float64 across appends of 1..3 events, every
profile mode, windows of other lengths in the same batch).

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
    """One block's part of a window: keys and values (1, nh, P, hs), the last normalised inputs (1, <=front, D)."""

    k: torch.Tensor
    v: torch.Tensor
    tail: torch.Tensor


@dataclass
class WindowCache:
    """What appending to one window reads (see the module doc); `n` events, not counting a profile position."""

    layers: list[LayerCache]
    n: int

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for lc in self.layers for t in (lc.k, lc.v, lc.tail))


def supports(model: NeuralModel) -> bool:
    """Whether `extend` computes this model's states (its blocks are `Block`s whose parallel module, if any, is
    SPRM)."""
    if not isinstance(model, (Panther, SASRec)):
        return False
    return all(isinstance(b, Block) and (b.parallel is None or isinstance(b.parallel, SPRM)) for b in model.blocks)


def freeze(model: NeuralModel) -> NeuralModel:
    """The model with its SPRM parameters folded once (`SPRM.freeze`): for an inference copy whose parameters
    never change again, such as the service's float64 model; a one-event forward then costs its event only."""
    for m in model.modules():
        if isinstance(m, SPRM):
            m.freeze()
    return model


def reach(block: Block) -> int:
    """How many earlier normalised inputs the block's parallel module reads (SPRM's longest tap shift)."""
    p = block.parallel
    return max((w - 1) * r for w, r in p.kernels) if isinstance(p, SPRM) else 0


def _pad_left(rows: list[torch.Tensor], n: int) -> torch.Tensor:
    """(1, r_b, D) each -> (B, n, D), each on the right, zeros before (SPRM reads zeros before a window)."""
    if all(r.shape[1] == n for r in rows):
        return rows[0] if len(rows) == 1 else torch.cat(rows)
    out = rows[0].new_zeros(len(rows), n, rows[0].shape[-1])
    for b, r in enumerate(rows):
        if r.shape[1]:
            out[b, n - r.shape[1]:] = r[0]
    return out


def _pad_right(kv: list[torch.Tensor], n: int) -> torch.Tensor:
    """(1, nh, P_b, hs) each -> (B, nh, n, hs), zeros after."""
    if all(t.shape[2] == n for t in kv):
        return kv[0] if len(kv) == 1 else torch.cat(kv)
    out = kv[0].new_zeros(len(kv), kv[0].shape[1], n, kv[0].shape[3])
    for b, t in enumerate(kv):
        out[b, :, :t.shape[2]] = t[0]
    return out


def _block_extend(block: Block, x: torch.Tensor, past: list[LayerCache], new: list[int]
                  ) -> tuple[torch.Tensor, list[LayerCache]]:
    """`Block.forward` for the new positions x (B, T, D) of B windows after their cached ones (row b's first
    new[b] real) -> (B, T, D) and each window's cache of the block."""
    front = reach(block)
    past_len = [lc.k.shape[2] for lc in past]
    P = max(past_len)
    h = block.ln_1(x)
    y, k, v = block.attn.extend(h, _pad_right([lc.k for lc in past], P), _pad_right([lc.v for lc in past], P),
                                None if min(past_len) == P else torch.tensor(past_len))
    out = x + y
    if block.parallel is not None:  # SPRM reads back at most `front` rows: the cached ones, then the new
        out = out + block.parallel(torch.cat([_pad_left([lc.tail for lc in past], front), h], dim=1))[:, -x.shape[1]:]
    out = out + block.mlp(block.ln_2(out))
    caches = []
    for b, (lc, p, m) in enumerate(zip(past, past_len, new)):
        rows = torch.cat([lc.tail[0], h[b, :m]])
        tail = rows[len(rows) - min(front, len(rows)):].unsqueeze(0).clone()
        if p == P:  # no padding between the past and the new positions
            caches.append(LayerCache(k[b:b + 1, :, :P + m].clone(), v[b:b + 1, :, :P + m].clone(), tail))
        else:
            caches.append(LayerCache(torch.cat([k[b:b + 1, :, :p], k[b:b + 1, :, P:P + m]], dim=2),
                                     torch.cat([v[b:b + 1, :, :p], v[b:b + 1, :, P:P + m]], dim=2), tail))
    return out, caches


def extend(model: NeuralModel, batch: Batch, caches: list[WindowCache] | None = None
           ) -> tuple[torch.Tensor, list[WindowCache]]:
    """The causal states (B, T, D) of the batch's events, row b appended to the window `caches[b]` (None: each
    row a window of its own, as `model.hidden` takes them), and each window's cache after them. Rows are
    right-padded (PAD tokens); the profile is the batch's (`positional`: added to the new events;
    `first_token`: its position is made when there are no caches)."""
    mode = getattr(model, "profile_mode", "none")
    encoder = getattr(model, "profile", None)
    e_u = encoder(batch) if encoder is not None else None  # (B, D)
    B, T = batch.tokens.shape
    real = batch.mask  # (B, T)
    new = real.sum(1).tolist()
    starts = torch.tensor([0] * B if caches is None else [c.n for c in caches])
    positions = (starts.unsqueeze(1) + torch.arange(T)).masked_fill(~real, 0)  # (B, T)
    x = model.embedding(batch, model.token_emb, e_u if mode == "positional" else None, positions)  # (B, T, D)
    keep = padding_mask(batch).to(x.dtype) if isinstance(model, SASRec) else None  # SASRec zeroes padding
    if keep is not None:
        x = x * keep
    prefix = int(mode == "first_token" and caches is None)
    if prefix:
        x = torch.cat([e_u.unsqueeze(1), x], dim=1)  # (B, 1 + T, D)
    layers = []
    for i, block in enumerate(model.blocks):
        past = [c.layers[i] for c in caches] if caches is not None else [_empty(block, x)] * B
        x, lcs = _block_extend(block, x, past, [m + prefix for m in new])
        if keep is not None:
            x = x * keep
        layers.append(lcs)
    x = model.ln_f(x)
    out = [WindowCache([lcs[b] for lcs in layers], int(starts[b]) + new[b]) for b in range(B)]
    return (x[:, 1:] if prefix else x), out


def _empty(block: Block, x: torch.Tensor) -> LayerCache:
    D = x.shape[-1]
    z = x.new_zeros(1, block.attn.n_heads, 0, D // block.attn.n_heads)
    return LayerCache(z, z, x.new_zeros(1, 0, D))


__all__ = ["LayerCache", "WindowCache", "extend", "freeze", "reach", "supports"]
