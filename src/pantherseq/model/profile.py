"""User-profile embedding and contrastive personalisation (PANTHER paper §3.4, SPEC §4).

`ProfileEncoder` turns the static profile of each user into e_u (B, D): one embedding table per
categorical field (code 0 = unknown), summed, plus a linear projection of the standardised numeric
fields. `contrastive_loss` pulls together users that share demographics (SPEC Eq. 5):

    L_CL = −(1/|Pos|) Σ_{(i,j)∈Pos} log[ exp(−‖e_i−e_j‖²/τ) / Σ_{k≠i} exp(−‖e_i−e_k‖²/τ) ]

Normalisation (the paper writes a plain sum): we divide by the number of ordered positive pairs
|Pos|, so the loss is an average log-probability, its scale does not grow with the batch size, and
the mixing weight λ in L = (1−λ)·L_gen + λ·L_CL keeps one meaning across batch sizes. A batch without
a positive pair contributes 0 (a zero tensor still attached to the graph).
"""

from __future__ import annotations

import torch
from torch import nn

from pantherseq.model.base import Batch, DataInfo, ModelConfig


def has_profile(info: DataInfo) -> bool:
    return len(info.profile_cat_sizes) > 0 or info.profile_num > 0


class ProfileEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, info: DataInfo):
        super().__init__()
        self.cat_embs = nn.ModuleList(nn.Embedding(n, cfg.d_model) for n in info.profile_cat_sizes)
        self.num_proj = nn.Linear(info.profile_num, cfg.d_model) if info.profile_num > 0 else None

    def forward(self, batch: Batch) -> torch.Tensor:
        """profile_cat (B, Pc) int64, profile_num (B, Pn) float -> e_u (B, D)."""
        parts = [emb(batch.profile_cat[:, i]) for i, emb in enumerate(self.cat_embs)]
        if self.num_proj is not None:
            parts.append(self.num_proj(batch.profile_num.to(self.num_proj.weight.dtype)))
        if not parts:
            raise ValueError("ProfileEncoder needs at least one profile field (see has_profile)")
        return torch.stack(parts).sum(0)


def contrastive_loss(e: torch.Tensor, positives: torch.Tensor, tau: float) -> torch.Tensor:
    """e (B, D), positives (B, B) bool (diagonal ignored) -> scalar L_CL, averaged over positive pairs."""
    B = e.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=e.device)
    pos = positives.bool() & ~eye
    n_pos = int(pos.sum())
    if n_pos == 0:
        return e.sum() * 0.0
    sq = (e * e).sum(-1)  # (B,)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp_min(0.0)  # (B, B) ‖e_i − e_k‖²
    logits = (-d2 / tau).masked_fill(eye, float("-inf"))  # k ≠ i
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # (B, B)
    return -log_p.masked_fill(~pos, 0.0).sum() / n_pos


def contrastive_loss_reference(e: torch.Tensor, positives: torch.Tensor, tau: float) -> torch.Tensor:
    """Plain loops over i, j, k of the same formula (for the tests)."""
    B = e.shape[0]
    total, n_pos = e.new_zeros(()), 0
    for i in range(B):
        for j in range(B):
            if i == j or not bool(positives[i, j]):
                continue
            num = torch.exp(-((e[i] - e[j]) ** 2).sum() / tau)
            den = sum(torch.exp(-((e[i] - e[k]) ** 2).sum() / tau) for k in range(B) if k != i)
            total = total - torch.log(num / den)
            n_pos += 1
    return total / max(n_pos, 1)
