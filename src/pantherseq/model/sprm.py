"""SPRM, the Sequence Pattern Recognition Module (PANTHER paper §3.3, SPEC §4).

Runs in parallel with self-attention inside each block, on the same normalised input H (B, T, D):

(i) local pattern aggregation: for every (kernel w, dilation r) in cfg.sprm_kernels a depthwise
    causal dilated 1-D convolution (left padding (w-1)·r, groups = D), e.g. (3, 1) for immediate
    clusters and (3, 2), (3, 4) for periodic ones; the outputs are concatenated (D·#pairs) and
    projected back to D, giving H_p (B, T, D). Computed as w shifted multiply-adds per pair
    (`causal_taps`) rather than by Conv1d: a depthwise convolution is slow on CPU (and very slow in
    float64, which the fraud scoring passes use), while a few shifted adds are memory-bound and cheap.
    The parameters stay those of `nn.Conv1d` (weight (D, 1, w), bias (D,)), so checkpoints are unchanged.
(ii) prototype matching: M learnable prototypes P (M, D); Q = H_p W_Q, K = P W_K, V = P W_V,
    X_p = softmax(Q Kᵀ / √d_k) V  (B, T, D), at cost O(T·M) instead of O(T²).

Decisions the paper leaves open: one attention head with d_k = D (so the weights (B, T, M) are one
map per position, as plotted in the paper's Fig. 3); no output projection after X_p (W_V already maps
into the residual stream). The last forward's weights are kept, detached, in `last_attention`.

`reference_sprm` is a plain loop implementation of the same maths, used by the tests to check the
fast path and to prove causality independently of the conv padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pantherseq.model.base import ModelConfig


def causal_taps(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, w: int, r: int,
                padded: torch.Tensor | None = None) -> torch.Tensor:
    """A causal dilated depthwise convolution as shifted multiply-adds: h (B, T, D), weight (D, 1, w) and bias
    (D,) of an `nn.Conv1d(D, D, w, dilation=r, groups=D)` -> (B, T, D) with
    out[t] = bias + Σ_j weight[:, 0, j] · h[t − (w − 1 − j)·r]  (positions before the start count as zero).
    `padded`: h with P >= (w − 1)·r zero rows in front (B, P + T, D), shared by several calls; the taps are
    views into it (no copies), one fused multiply-add each."""
    T = h.shape[1]
    if padded is None:
        padded = F.pad(h, (0, 0, (w - 1) * r, 0))
    front = padded.shape[1] - T
    out = bias.to(h.dtype).expand_as(h)
    for j in range(w):
        s = (w - 1 - j) * r
        out = torch.addcmul(out, padded[:, front - s:front - s + T], weight[:, 0, j].to(h.dtype))
    return out


class SPRM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.d_model
        self.kernels = [(int(w), int(r)) for w, r in cfg.sprm_kernels]
        if not self.kernels or any(w < 1 or r < 1 for w, r in self.kernels):
            raise ValueError(f"sprm_kernels must be non-empty [kernel, dilation] pairs >= 1, "
                             f"got {cfg.sprm_kernels}")
        self.convs = nn.ModuleList(nn.Conv1d(D, D, w, dilation=r, groups=D) for w, r in self.kernels)
        self.merge = nn.Linear(D * len(self.kernels), D)
        self.prototypes = nn.Parameter(torch.randn(cfg.n_prototypes, D))  # (M, D), LayerNorm-output scale
        self.w_q = nn.Linear(D, D, bias=False)
        self.w_k = nn.Linear(D, D, bias=False)
        self.w_v = nn.Linear(D, D, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.last_attention: torch.Tensor | None = None  # (B, T, M), set by forward
        self.frozen: tuple | None = None  # the folded parameters, once `freeze` is called
        self._stacked: torch.Tensor | None = None

    def local_patterns(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> H_p (B, T, D): causal dilated depthwise convolutions, concatenated, projected."""
        return self.merge(self._taps(h))

    def _taps(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D·#pairs): every (kernel, dilation)'s causal convolution, concatenated."""
        front = max((w - 1) * r for w, r in self.kernels)
        padded = F.pad(h, (0, 0, front, 0)) if front else h  # (B, front + T, D), shared by every tap
        return torch.cat([causal_taps(h, conv.weight, conv.bias, w, r, padded)
                          for conv, (w, r) in zip(self.convs, self.kernels)], dim=-1)

    def prototype_attention(self, hp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """H_p (B, T, D) -> X_p (B, T, D) and the weights (B, T, M)."""
        q = self.w_q(hp)  # (B, T, D)
        k = self.w_k(self.prototypes)  # (M, D)
        v = self.w_v(self.prototypes)  # (M, D)
        att = torch.softmax(q @ k.t() / math.sqrt(q.shape[-1]), dim=-1)  # (B, T, M)
        return att @ v, att

    def folded(self) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The parameters as `forward` uses them: per tap shift s the (D, M) block of the folded matrix, the
        logits' bias (M,) and the prototype values W_V P (M, D) (see `forward`)."""
        if self.frozen is not None:
            return self.frozen
        k = self.w_k(self.prototypes)  # (M, D)
        scale = 1.0 / math.sqrt(k.shape[-1])
        D = k.shape[-1]
        a = (self.merge.weight.t() @ self.w_q.weight.t() @ k.t()) * scale  # (D·#pairs, M)
        c = (self.w_q(self.merge.bias) @ k.t()) * scale  # (M,)
        per_shift: dict[int, list[torch.Tensor]] = {}
        for i, (conv, (w, r)) in enumerate(zip(self.convs, self.kernels)):
            a_i = a[i * D:(i + 1) * D]  # (D, M): this pair's block
            c = c + conv.bias @ a_i
            for j in range(w):
                per_shift.setdefault((w - 1 - j) * r, []).append(conv.weight[:, 0, j].unsqueeze(1) * a_i)
        return {s: torch.stack(m).sum(0) for s, m in sorted(per_shift.items())}, c, self.w_v(self.prototypes)

    def _all_blocks(self, blocks: dict[int, torch.Tensor]) -> torch.Tensor:
        """(S·D, M): every shift's block stacked (kept with the frozen parameters: made once)."""
        if self.frozen is None:
            return torch.cat(list(blocks.values()))
        if self._stacked is None:
            self._stacked = torch.cat(list(blocks.values()))
        return self._stacked

    def freeze(self) -> None:
        """Fold the parameters once for every later forward (`folded`): for a copy used only for inference
        (the service's float64 model), whose parameters never change again; the small per-call cost of
        folding them would otherwise dominate a forward over one new event (model/incremental.py)."""
        self.frozen, self._stacked = None, None
        with torch.no_grad():
            self.frozen = self.folded()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); position t depends on h[:, :t+1] only.

        The same maths as prototype_attention(local_patterns(h)), in one product: the convolutions, merge,
        W_Q and the product with Kᵀ are all linear with nothing in between, so they fold into one
        (S·D, M) matrix made from the parameters (`folded`, at each call unless frozen), S the distinct tap
        shifts (0, 1, 2, 4, 8 for the default kernels); the input is the S shifted views of h side by side
        (B·T, S·D), and one product gives the prototype logits (tested equal to the loop reference)."""
        blocks, c, values = self.folded()
        T = h.shape[1]
        shifts = [s for s in blocks if s < T]  # a shift of T or more only ever reads padding
        front = shifts[-1]
        padded = F.pad(h, (0, 0, front, 0)) if front else h
        x = torch.cat([padded[:, front - s:front - s + T] for s in shifts], dim=-1)  # (B, T, S·D)
        b = torch.cat([blocks[s] for s in shifts]) if len(shifts) < len(blocks) else self._all_blocks(blocks)
        att = torch.softmax(torch.addmm(c.to(h.dtype), x.flatten(0, 1), b.to(h.dtype)), dim=-1)
        att = att.view(*h.shape[:2], -1)  # (B, T, M)
        self.last_attention = att.detach()
        return self.drop(att @ values)


def reference_sprm(m: SPRM, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop version of SPRM.forward (no dropout): explicit taps over the past, one position at a time.

    Returns X_p (B, T, D) and the prototype weights (B, T, M).
    """
    B, T, D = h.shape
    k = m.prototypes @ m.w_k.weight.t()  # (M, D)
    v = m.prototypes @ m.w_v.weight.t()  # (M, D)
    xs, atts = [], []
    for t in range(T):
        parts = []
        for conv, (w, r) in zip(m.convs, m.kernels):
            acc = conv.bias.expand(B, D).clone()  # (B, D)
            for j in range(w):  # tap j looks back (w-1-j)·r steps; before the start counts as zero
                src = t - (w - 1 - j) * r
                if src >= 0:
                    acc = acc + h[:, src, :] * conv.weight[:, 0, j]
            parts.append(acc)
        hp = torch.cat(parts, dim=1) @ m.merge.weight.t() + m.merge.bias  # (B, D)
        q = hp @ m.w_q.weight.t()  # (B, D)
        att = torch.softmax(q @ k.t() / math.sqrt(D), dim=-1)  # (B, M)
        xs.append(att @ v)
        atts.append(att)
    return torch.stack(xs, dim=1), torch.stack(atts, dim=1)
