"""Output heads every neural model can switch on (SPEC §4–6): a repeat-aware copy head and per-field heads.

CopyHead (`copy_head = true`), RepeatNet-style (Ren et al., AAAI 2019): a learned gate g_t mixes a pointer
distribution over the user's own past tokens with the vocabulary softmax,

    P(y | t) = g_t · Σ_k a_tk [key_k = y]  +  (1 − g_t) · softmax(logits_t)(y),

a_tk = softmax_k(q_t · k_k / √D + b(bucket(t − pos_k))) over the keys the position may see: the window's
inputs up to t and the `history` events before the window (Batch.history, so a user's history beyond
max_len is reachable); q_t = W_q h_t, k_k = W_k e(key_k) (e the token embedding), b a learned bias per
log2-distance bucket (recency). Causal by construction: a key after t is masked. A position with no key
(a user's first event) has g_t = 0. Repeated tokens gather the weight of each of their occurrences, so a
flat attention gives the user's personal frequency and the bias lets the model prefer recent ones.

FieldHeads (`field_heads = true`): one linear head per event field (amount bucket, merchant / terminal,
channel, category, hour bucket...) predicting the next event's code of that field, trained as auxiliary
losses (weight `field_loss_weight`); an UNK event still has per-field targets (Batch.target_codes). The
per-field log-probabilities are exposed (`field_log_probs`) for the deviation features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pantherseq.data.schema import N_SPECIAL

N_DISTANCE_BUCKETS = 16  # log2 buckets: 0, 1, 2-3, 4-7, ... 2^14+


def distance_buckets(d: torch.Tensor) -> torch.Tensor:
    """Non-negative distances -> log2 buckets 0..N_DISTANCE_BUCKETS − 1 (0 = the same position)."""
    b = torch.floor(torch.log2(d.clamp_min(0).to(torch.float32) + 1.0)).long()
    return b.clamp_max(N_DISTANCE_BUCKETS - 1)


class CopyHead(nn.Module):
    """The pointer distribution over the user's own past tokens and its gate (see the module doc)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.w_q = nn.Linear(d_model, d_model, bias=False)
        self.w_k = nn.Linear(d_model, d_model, bias=False)
        self.distance_bias = nn.Embedding(N_DISTANCE_BUCKETS, 1)
        self.gate = nn.Linear(d_model, 1)
        nn.init.zeros_(self.distance_bias.weight)

    def forward(self, h: torch.Tensor, tokens: torch.Tensor, history: torch.Tensor | None,
                token_emb: nn.Embedding) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (B, T, D), tokens (B, T) window inputs, history (B, H) earlier events (PAD = none, oldest
        first, the last one just before the window) -> keys (B, K) token ids, a (B, T, K) pointer weights
        (rows sum to 1, or 0 with no key), g (B, T) gate (0 where there is no key). K = H + T."""
        B, T = tokens.shape
        hist = history if history is not None else tokens.new_zeros((B, 0))
        H = hist.shape[1]
        keys = torch.cat([hist, tokens], dim=1)  # (B, K)
        pos_k = torch.arange(-H, T, device=tokens.device)  # history before position 0
        dist = torch.arange(T, device=tokens.device).unsqueeze(1) - pos_k.unsqueeze(0)  # (T, K)
        visible = (dist >= 0).unsqueeze(0) & (keys >= N_SPECIAL).unsqueeze(1)  # (B, T, K): PAD/UNK are no keys
        q = self.w_q(h)  # (B, T, D)
        k = self.w_k(token_emb(keys)).to(h.dtype)  # (B, K, D)
        s = q @ k.transpose(1, 2) / math.sqrt(h.shape[-1])  # (B, T, K)
        s = s + self.distance_bias(distance_buckets(dist)).squeeze(-1).to(h.dtype)
        s = s.masked_fill(~visible, float("-inf"))
        any_key = visible.any(-1)  # (B, T)
        a = torch.softmax(s.masked_fill(~any_key.unsqueeze(-1), 0.0), dim=-1) * any_key.unsqueeze(-1)
        g = torch.sigmoid(self.gate(h).squeeze(-1)) * any_key
        return keys, a, g

    @staticmethod
    def target_prob(keys: torch.Tensor, a: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """P_copy(target) (B, T) = Σ_k a_tk [key_k = target_t]."""
        return (a * (keys.unsqueeze(1) == targets.unsqueeze(-1))).sum(-1)

    @staticmethod
    def dense(keys: torch.Tensor, a: torch.Tensor, vocab: int) -> torch.Tensor:
        """The pointer distribution over the vocabulary (B, T, V) (scatter of a onto the key ids)."""
        B, T, K = a.shape
        out = a.new_zeros((B, T, vocab))
        return out.scatter_add_(2, keys.unsqueeze(1).expand(B, T, K), a)


def mix_log_probs(log_vocab: torch.Tensor, p_copy: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """log((1 − g) · exp(log_vocab) + g · p_copy), elementwise (any shape; g broadcast by the caller)."""
    # -inf where the copy distribution has no mass; the clamp keeps log's gradient finite there (0, not NaN)
    log_copy = torch.log(p_copy.clamp_min(1e-30)).masked_fill(p_copy <= 0, float("-inf"))
    return torch.logaddexp(torch.log1p(-g.clamp_max(1 - 1e-6)) + log_vocab, torch.log(g.clamp_min(1e-30)) + log_copy)


class FieldHeads(nn.Module):
    """One linear head per event field over that field's codes (0 = the field's UNK, never a target)."""

    def __init__(self, d_model: int, field_sizes: list[int]):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(d_model, int(n)) for n in field_sizes)

    def log_probs(self, h: torch.Tensor) -> list[torch.Tensor]:
        """h (..., D) -> [(..., size_f) log P(next field f = c)] for every field f."""
        return [F.log_softmax(head(h), dim=-1) for head in self.heads]

    def loss(self, h: torch.Tensor, target_codes: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean over fields of the cross-entropy at positions whose next event has a known code."""
        losses, parts = [], {}
        for f, head in enumerate(self.heads):
            y = target_codes[..., f]
            keep = y > 0
            if not keep.any():
                continue
            loss = F.cross_entropy(head(h[keep]), y[keep])
            losses.append(loss)
            parts[f"field{f}"] = float(loss.detach())
        if not losses:
            return h.new_zeros(()), parts
        return torch.stack(losses).mean(), parts


__all__ = ["CopyHead", "FieldHeads", "distance_buckets", "mix_log_probs"]
