"""HSTU (Zhai et al., "Actions Speak Louder than Words: Trillion-Parameter Sequential Transducers for
Generative Recommendations", ICML 2024, arXiv 2402.17152, §3.1 Eq. 1-3), as a baseline.

One HSTU layer on X (B, T, D), following Meta's generative-recommenders reference code:

    U, V, Q, K = split(SiLU(f1(LayerNorm(X))))                 pointwise projection
    A = SiLU(Q Kᵀ + rab) / n, causal-masked                     pointwise attention, no softmax
    Y = X + Dropout(f2(LayerNorm(A V) ⊙ U))                     gated transformation

rab is a learned relative position bias per layer, shared by the heads, indexed by i − j. Decisions:
n is cfg.max_len (the padded length in the reference code), a constant, so a real position's output
never depends on how much padding follows; the reference's bucketed time-difference bias needs
absolute timestamps, which a Batch does not carry, so only the position bias is used. Inputs are
√D-scaled item embeddings + learned positions (as the reference's preprocessor); the output goes
through a final LayerNorm into the shared output layer and cross-entropy of `NeuralModel`
(the reference L2-normalises and uses a sampled softmax with temperature).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pantherseq.model.base import Batch, DataInfo, ModelConfig, NeuralModel
from pantherseq.model.layers import InputEmbedding, init_weights, padding_mask, split_heads, token_scale


class HSTULayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}")
        D = cfg.d_model
        self.n_heads, self.n = cfg.n_heads, cfg.max_len
        self.ln_in = nn.LayerNorm(D)
        self.f1 = nn.Linear(D, 4 * D)
        self.rel_bias = nn.Parameter(torch.randn(cfg.max_len) * 0.02)  # bias of relative position i − j
        self.ln_attn = nn.LayerNorm(D)
        self.f2 = nn.Linear(D, D)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        B, T, D = x.shape
        u, v, q, k = F.silu(self.f1(self.ln_in(x))).split(D, dim=2)  # each (B, T, D)
        q, k, v = (split_heads(z, self.n_heads) for z in (q, k, v))  # (B, nh, T, hs)
        pos = torch.arange(T, device=x.device)
        rel = (pos.unsqueeze(1) - pos.unsqueeze(0)).clamp_min(0)  # (T, T) i − j
        causal = pos.unsqueeze(1) >= pos.unsqueeze(0)  # (T, T)
        a = F.silu(q @ k.transpose(-2, -1) + self.rel_bias[rel]) / self.n  # (B, nh, T, T)
        a = a.masked_fill(~causal, 0.0)
        y = (a @ v).transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return x + self.drop(self.f2(self.ln_attn(y) * u))


class HSTU(NeuralModel):
    def __init__(self, cfg: ModelConfig, info: DataInfo):
        super().__init__(cfg, info)
        self.embedding = InputEmbedding(cfg, info, scale=token_scale(cfg))
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(init_weights)

    def hidden(self, batch: Batch) -> torch.Tensor:
        """-> (B, T, D) causal states."""
        keep = padding_mask(batch)  # (B, T, 1)
        x = self.embedding(batch, self.token_emb) * keep
        for layer in self.layers:
            x = layer(x) * keep
        return self.ln_f(x)
