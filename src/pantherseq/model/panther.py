"""PANTHER (Li et al., NeurIPS 2025, arXiv 2510.10102, §3.3-3.4) and its Transformer baseline.

    InputEmbedding (+ e_u) -> n_layers × Block(attention ∥ SPRM, FFN) -> LayerNorm -> shared output layer

Profile modes (paper §3.4), used only when the data has profile fields (otherwise silently `none`):
- `positional`: e_u is added to every position's input embedding (the paper's better variant);
- `first_token`: e_u occupies an extra position prepended at the front, so every event, the first
  included, can attend to it; that position has no position embedding of its own (e_u is learned,
  a second vector would be redundant), events keep positions 0..T-1, and its output is dropped so
  `hidden` stays aligned with `batch.tokens`;
- `none`.
With cfg.contrastive_lambda > 0 and a profile in use, `extra_loss` adds the contrastive term (see
profile.py) on e_u (`contrastive_on = "profile"`) or on the normalised pooled causal states (`"history"`,
history-dependent, the paper's Fig. 2); the trainer mixes L = (1−λ)·L_gen + λ·L_CL (base.NeuralModel.loss).
`"self"` needs no profile: the batches carry one view per window (a random slice of a random training window
of the same user, data/shards.py `add_views`) and the same term on the pooled states takes a user's windows and
views as its positives — CoLES's objective (Babaev et al. 2022) beside the generative one.

`Transformer` is the same backbone with SPRM, profile and contrastive loss switched off: the paper's
"Transformer" baseline.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pantherseq.model.base import Batch, DataInfo, ModelConfig, NeuralModel, mean_states
from pantherseq.model.layers import Block, InputEmbedding, init_weights
from pantherseq.model.profile import ProfileEncoder, contrastive_loss, has_profile
from pantherseq.model.sprm import SPRM

PROFILE_MODES = ("positional", "first_token", "none")


class Panther(NeuralModel):
    def __init__(self, cfg: ModelConfig, info: DataInfo):
        super().__init__(cfg, info)
        if cfg.profile_mode not in PROFILE_MODES:
            raise ValueError(f"unknown profile_mode {cfg.profile_mode!r}; valid: {', '.join(PROFILE_MODES)}")
        self.profile_mode = cfg.profile_mode if has_profile(info) else "none"
        self.embedding = InputEmbedding(cfg, info)
        self.profile = ProfileEncoder(cfg, info) if self.profile_mode != "none" else None
        self.blocks = nn.ModuleList(Block(cfg, SPRM(cfg) if cfg.sprm else None) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(init_weights)

    def hidden(self, batch: Batch) -> torch.Tensor:
        """-> (B, T, D) causal states aligned with batch.tokens."""
        e_u = self.profile(batch) if self.profile is not None else None  # (B, D)
        added = e_u if self.profile_mode == "positional" else None
        x = self.embedding(batch, self.token_emb, added)  # (B, T, D)
        first = self.profile_mode == "first_token"
        if first:
            x = torch.cat([e_u.unsqueeze(1), x], dim=1)  # (B, 1 + T, D)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return x[:, 1:] if first else x

    @property
    def view_min(self) -> int:
        on_self = self.cfg.contrastive_lambda > 0 and self.cfg.contrastive_on == "self"
        return max(1, int(self.cfg.contrastive_view_min)) if on_self else 0

    def extra_loss(self, batch: Batch, hidden: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
        if self.cfg.contrastive_lambda <= 0 or (self.profile is None and not self.view_min):
            return None, {}
        if self.cfg.contrastive_on in ("history", "self"):  # pooled causal states, on the unit sphere
            e = torch.nn.functional.normalize(mean_states(hidden, batch.mask), dim=-1)
        else:
            e = self.profile(batch)
        cl = contrastive_loss(e, batch.positives, self.cfg.contrastive_tau)
        return cl, {"cl": float(cl.detach())}

    def prototype_attention(self) -> torch.Tensor | None:
        """(B, T, M) prototype weights of the last SPRM layer from the latest forward (None without SPRM)."""
        sprms = [b.parallel for b in self.blocks if isinstance(b.parallel, SPRM)]
        if not sprms or sprms[-1].last_attention is None:
            return None
        att = sprms[-1].last_attention
        return att[:, 1:] if self.profile_mode == "first_token" else att


class Transformer(Panther):
    """The paper's "Transformer" baseline: PANTHER's backbone without SPRM, profile or contrastive loss."""

    def __init__(self, cfg: ModelConfig, info: DataInfo):
        cfg = dataclasses.replace(cfg, sprm=False, profile_mode="none", contrastive_lambda=0.0)
        super().__init__(cfg, info)
