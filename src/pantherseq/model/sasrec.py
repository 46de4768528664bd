"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018), as a baseline.

Paper §III: item embedding scaled by √d (as the authors' code) + learned position embedding, dropout,
padding positions zeroed ("timeline mask"); b stacked blocks of causal self-attention and a point-wise
two-layer ReLU feed-forward of width d, each sublayer as x + Dropout(g(LayerNorm(x))); a final
LayerNorm; prediction by the dot product with the (shared) item embedding.

Trained here with the shared full / sampled cross-entropy of `NeuralModel` (as RecBole's
loss_type="CE"), not the paper's one-negative binary cross-entropy. Ignores the PANTHER knobs
(SPRM, profile); honours field_embeddings / time_gap like every model built on `InputEmbedding`.
"""

from __future__ import annotations

import torch
from torch import nn

from pantherseq.model.base import Batch, DataInfo, ModelConfig, NeuralModel
from pantherseq.model.layers import MLP, Block, InputEmbedding, init_weights, padding_mask, token_scale


class SASRec(NeuralModel):
    def __init__(self, cfg: ModelConfig, info: DataInfo):
        super().__init__(cfg, info)
        self.embedding = InputEmbedding(cfg, info, scale=token_scale(cfg))
        self.blocks = nn.ModuleList(Block(cfg, mlp=MLP(cfg, hidden=cfg.d_model, act=nn.ReLU))
                                    for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(init_weights)

    def hidden(self, batch: Batch) -> torch.Tensor:
        """-> (B, T, D) causal states."""
        keep = padding_mask(batch)  # (B, T, 1)
        x = self.embedding(batch, self.token_emb) * keep
        for block in self.blocks:
            x = block(x) * keep
        return self.ln_f(x)
