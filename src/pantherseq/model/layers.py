"""Transformer parts shared by the neural models (SPEC §4, paper §3.3), leaf-first.

    CausalSelfAttention   multi-head attention where position t sees positions <= t
                          (`extend`: new positions attending to cached keys and values, model/incremental.py)
    MLP                   the position-wise feed-forward layer
    Block                 pre-norm block: x + attn(ln(x)) [+ parallel(ln(x))], then x + mlp(ln(x))
    InputEmbedding        token + learned position [+ per-field] [+ time-gap] [+ profile] embeddings

Padding is on the right (PAD = 0), so a causal mask alone keeps real positions away from padding;
padded positions still attend to themselves and earlier positions, so no softmax row is empty and no
NaN appears. Their states are meaningless and ignored by the loss (targets are PAD there).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pantherseq.data.schema import GAP_BUCKETS, PAD
from pantherseq.errors import ConfigError
from pantherseq.model.base import Batch, DataInfo, ModelConfig


def init_weights(module: nn.Module) -> None:
    """nanoGPT-style init: N(0, 0.02) for linear and embedding weights, zero biases, PAD row zero."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, D) -> (B, nh, T, hs)."""
    B, T, D = x.shape
    return x.view(B, T, n_heads, D // n_heads).transpose(1, 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}")
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (split_heads(z, self.n_heads) for z in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.resid_drop(self.proj(y))

    def extend(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
               past_len: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward` for T new positions after P cached ones: x (B, T, D), past keys and values (B, nh, P, hs), of
        which row b's first past_len[b] are real (None: all P) -> the output (B, T, D) and the keys and values
        [past, new] (B, nh, P + T, hs). New position t sees the real past and the new positions <= t."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (split_heads(z, self.n_heads) for z in (q, k, v))  # (B, nh, T, hs)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        P = past_k.shape[2]
        j, t = torch.arange(P + T, device=x.device), torch.arange(T, device=x.device)
        new = (j >= P) & (j - P <= t.unsqueeze(1))  # (T, P + T)
        real = (j < P).expand(B, P + T) if past_len is None else j < past_len.unsqueeze(1)  # (B, P + T)
        mask = (new.unsqueeze(0) | real.unsqueeze(1)).unsqueeze(1)  # (B, 1, T, P + T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, D))), k, v


class MLP(nn.Module):
    """Linear -> activation -> Linear -> dropout; hidden width `hidden` (default 4·D)."""

    def __init__(self, cfg: ModelConfig, hidden: int | None = None, act: type[nn.Module] = nn.GELU):
        super().__init__()
        hidden = hidden or 4 * cfg.d_model
        self.fc = nn.Linear(cfg.d_model, hidden)
        self.act = act()
        self.inner_drop = nn.Dropout(cfg.dropout)
        self.proj = nn.Linear(hidden, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        return self.drop(self.proj(self.inner_drop(self.act(self.fc(x)))))


class Block(nn.Module):
    """Pre-norm block. `parallel` (PANTHER's SPRM) reads the same normalised input as attention and
    its output is summed with attention's into the residual stream; `mlp` replaces the default FFN."""

    def __init__(self, cfg: ModelConfig, parallel: nn.Module | None = None, mlp: nn.Module | None = None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.parallel = parallel
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = mlp if mlp is not None else MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        h = self.ln_1(x)
        x = x + self.attn(h)
        if self.parallel is not None:
            x = x + self.parallel(h)
        return x + self.mlp(self.ln_2(x))


def input_field_index(cfg: ModelConfig, info: DataInfo) -> list[int]:
    """The indices of `cfg.input_fields` among the run's fields (every field when it is empty)."""
    if not cfg.input_fields:
        return list(range(len(info.field_sizes)))
    unknown = [f for f in cfg.input_fields if f not in info.field_names]
    if unknown:
        raise ConfigError(f"model.input_fields: {unknown[0]!r} is not an event field of this run; "
                          f"its fields: {', '.join(info.field_names) or 'unknown (an older checkpoint)'}")
    return [i for i, name in enumerate(info.field_names) if name in cfg.input_fields]


class InputEmbedding(nn.Module):
    """Event embeddings: scale·token + position [+ Σ field embeddings] [+ time gap] [+ profile].

    The token table is the model's own `NeuralModel.token_emb` (shared with the output layer when
    tied), passed to `forward` rather than held here, so the state_dict holds it once. Field
    embeddings (cfg.field_embeddings, one table per field, sizes from DataInfo.field_sizes) let an
    [UNK] token still carry its amount, channel and category (SPEC §3); `cfg.input_fields` names the fields
    that are added (empty: every one; the other fields' tables exist, unused, so the weights keep one layout).
    """

    def __init__(self, cfg: ModelConfig, info: DataInfo, scale: float = 1.0):
        super().__init__()
        self.scale, self.max_len = scale, cfg.max_len
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        use_fields = cfg.field_embeddings and len(info.field_sizes) > 0
        self.field_embs = (nn.ModuleList(nn.Embedding(n, cfg.d_model) for n in info.field_sizes)
                           if use_fields else None)
        self.fields_in = input_field_index(cfg, info) if use_fields else []
        self.gap_emb = nn.Embedding(GAP_BUCKETS, cfg.d_model) if cfg.time_gap else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, batch: Batch, token_emb: nn.Embedding,
                profile: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """-> (B, T, D); `profile` (B, D), if given, is added at every position (positional mode); `positions`
        (B, T): each input's position (default 0..T−1; events appended to a cached window start later,
        model/incremental.py)."""
        tokens = batch.tokens  # (B, T)
        T = tokens.shape[1]
        if positions is None:
            positions = torch.arange(T, device=tokens.device)
        if T and int(positions.max()) >= self.max_len:
            raise ValueError(f"sequence length {int(positions.max()) + 1} exceeds max_len={self.max_len}")
        x = token_emb(tokens) * self.scale + self.pos_emb(positions)
        if self.field_embs is not None:
            for f in self.fields_in:
                x = x + self.field_embs[f](batch.codes[:, :, f])
        if self.gap_emb is not None:
            x = x + self.gap_emb(batch.gap_bucket.clamp(0, GAP_BUCKETS - 1))
        if profile is not None:
            x = x + profile.unsqueeze(1)
        return self.drop(x)


def token_scale(cfg: ModelConfig) -> float:
    """The √D input scaling used by SASRec and HSTU's reference implementations."""
    return math.sqrt(cfg.d_model)


def padding_mask(batch: Batch) -> torch.Tensor:
    """(B, T, 1) float: 1 at real positions, 0 at padding (SASRec's "timeline mask")."""
    return (batch.tokens != PAD).unsqueeze(-1).float()
