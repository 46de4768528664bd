"""What every next-behaviour model shares: the batch, the config, the data sizes, the output layer and loss.

A `Batch` holds right-padded windows of events (PAD = 0); it and `DataInfo` are defined in data/batch.py
(the data side makes them) and re-exported here.

Neural models subclass `NeuralModel` and implement `hidden(batch) -> (B, T, D)`; the output layer
(tied to the token embedding or not), the loss (full, chunked or sampled softmax), `scores` for
evaluation and `embed` for user embeddings live here, so every model is trained and evaluated by the
same code. Count models (`markov`, `popular`) subclass `CountModel`: `observe(batch)` instead of
gradient steps, the same `scores` interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pantherseq.data.batch import Batch, DataInfo  # defined in data/, re-exported for the models
from pantherseq.data.schema import GAP_BUCKETS, N_SPECIAL, PAD  # noqa: F401 (GAP_BUCKETS re-exported)
from pantherseq.model.heads import CopyHead, FieldHeads, mix_log_probs


@dataclass
class ModelConfig:
    """One config for every model in the registry; a model ignores the knobs it has no use for."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 128
    dropout: float = 0.1
    tie_weights: bool = True
    loss: Literal["auto", "full", "chunked", "sampled"] = "auto"
    n_negatives: int = 1024  # sampled softmax
    auto_full_max_vocab: int = 20_000  # "auto" uses the full softmax up to this vocabulary size
    # the defaults are the best configuration measured by benchmarks/nextevent.py (docs/MODELS.md)
    field_embeddings: bool = True  # add per-field embeddings to the token embedding (SPEC §3)
    input_fields: list[str] = field(default_factory=list)  # the fields embedded as inputs; empty = every one
    time_gap: bool = True  # add a log time-gap bucket embedding
    # PANTHER (paper §3.3-3.4)
    sprm: bool = True
    sprm_kernels: list[list[int]] = field(default_factory=lambda: [[3, 1], [3, 2], [3, 4]])
    n_prototypes: int = 64
    profile_mode: Literal["positional", "first_token", "none"] = "positional"
    contrastive_lambda: float = 0.0  # off by default: it lowered HR@10 wherever measured (docs/MODELS.md)
    contrastive_tau: float = 1.0
    # what the contrastive term pulls together: `profile` = e_u, a function of the static profile alone (the
    # first implementation); `history` = the L2-normalised mean of the causal states over the window, a
    # history-dependent user representation (the paper's Fig. 2 "hidden states of user profile"); `self` = the
    # same pooled states, with other slices of the same user as the positives (CoLES-style views added to each
    # training batch, docs/MODELS.md): a user-level objective that needs no profile
    contrastive_on: Literal["profile", "history", "self"] = "profile"
    contrastive_view_min: int = 10  # `self`: the shortest view, in events (shorter windows give all they have)
    # output heads, for every neural model (model/heads.py)
    copy_head: bool = True  # repeat-aware copy head: a gate mixes a pointer over the user's own past tokens
    history: int = 512  # events before the window the copy head and `personal` can see
    field_heads: bool = True  # per-field next-value heads as auxiliary losses
    field_loss_weight: float = 0.2  # weight of the mean per-field cross-entropy
    # count models
    markov_backoff: float = 1.0  # weight of the popularity prior added to transition counts
    personal_decay: float = 1.0  # `personal`: an event k events back counts decay^k (1 = plain counts)


class SequenceModel(nn.Module):
    """The interface the trainer and evaluation use."""

    trainable = True

    @property
    def history_len(self) -> int:
        """How many events before each window the model reads (Batch.history); 0 = none."""
        return 0

    def scores(self, batch: Batch) -> torch.Tensor:
        """(B, T, V) next-token scores at every position (higher = more likely)."""
        raise NotImplementedError

    def target_scores(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (N, V) and targets (N,) at the positions that have a target, in row-major order."""
        keep = batch.targets != PAD
        return self.scores(batch)[keep], batch.targets[keep]

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores (N, V) -> the next-token distribution (N, V): their softmax (scores are logits or
        log-probabilities; a model whose scores are not overrides this)."""
        return torch.softmax(scores.float(), dim=-1)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


class NeuralModel(SequenceModel):
    def __init__(self, cfg: ModelConfig, info: DataInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        self.token_emb = nn.Embedding(info.vocab_size, cfg.d_model, padding_idx=PAD)
        self.out_bias = nn.Parameter(torch.zeros(info.vocab_size))
        self.out_proj = None if cfg.tie_weights else nn.Linear(cfg.d_model, info.vocab_size, bias=False)
        self.copy = CopyHead(cfg.d_model) if cfg.copy_head else None
        self.field_heads = FieldHeads(cfg.d_model, info.field_sizes) if cfg.field_heads else None

    @property
    def history_len(self) -> int:
        return int(self.cfg.history) if self.copy is not None else 0

    @property
    def view_min(self) -> int:
        """> 0: training batches carry a view of each window's user, at least this many events long."""
        return 0

    # -- to implement -------------------------------------------------------------------------
    def hidden(self, batch: Batch) -> torch.Tensor:
        """(B, T, D) causal states: position t sees inputs <= t only."""
        raise NotImplementedError

    def extra_loss(self, batch: Batch, hidden: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
        """Model-specific terms (PANTHER's contrastive loss); (None, {}) when there are none."""
        return None, {}

    # -- shared -------------------------------------------------------------------------------
    @property
    def output_weight(self) -> torch.Tensor:
        return self.token_emb.weight if self.out_proj is None else self.out_proj.weight

    def scores(self, batch: Batch) -> torch.Tensor:
        """(B, T, V) next-token scores: the logits, or with the copy head the log of the mixture."""
        h = self.hidden(batch)
        if self.copy is None:
            return self.logits(h)
        keys, a, g = self.copy(h, batch.tokens, batch.history, self.token_emb)
        log_v = F.log_softmax(self.logits(h).float(), dim=-1)
        return mix_log_probs(log_v, CopyHead.dense(keys, a.float(), log_v.shape[-1]), g.float().unsqueeze(-1))

    def target_scores(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        keep = batch.targets != PAD
        h = self.hidden(batch)
        if self.copy is None:
            return self.logits(h[keep]), batch.targets[keep]
        keys, a, g = self.copy(h, batch.tokens, batch.history, self.token_emb)
        log_v = F.log_softmax(self.logits(h[keep]).float(), dim=-1)  # (N, V)
        rows = torch.arange(batch.tokens.shape[0]).unsqueeze(1).expand_as(batch.tokens)[keep]  # (N,)
        p_copy = log_v.new_zeros(log_v.shape).scatter_add_(1, keys[rows], a[keep].float())
        return mix_log_probs(log_v, p_copy, g[keep].float().unsqueeze(-1)), batch.targets[keep]

    def field_log_probs(self, h: torch.Tensor) -> list[torch.Tensor] | None:
        """Per-field next-value log-probabilities [(..., size_f)] from states h (..., D); None without
        field heads."""
        return None if self.field_heads is None else self.field_heads.log_probs(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., V)."""
        return h @ self.output_weight.t() + self.out_bias

    def loss_kind(self) -> str:
        kind = self.cfg.loss
        if kind == "auto":
            return "full" if self.info.vocab_size <= self.cfg.auto_full_max_vocab else "sampled"
        return kind

    def target_log_probs(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N,) log softmax(logits)(y) at states h (N, D): exact for `full` / `chunked`, the sampled-softmax
        estimate for `sampled`."""
        kind = self.loss_kind()
        if kind == "full":
            return F.log_softmax(self.logits(h), dim=-1).gather(1, y.unsqueeze(1)).squeeze(1)
        if kind == "chunked":
            return -chunked_cross_entropy(h, y, self.output_weight, self.out_bias, reduction="none")
        return -sampled_softmax_loss(h, y, self.output_weight, self.out_bias, self.cfg.n_negatives, reduction="none")

    def generative_loss(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean next-token cross-entropy over positions with a target (of the copy mixture, with the head)."""
        targets = batch.targets
        keep = targets != PAD
        hk, y = h[keep], targets[keep]  # (N, D), (N,)
        if self.copy is not None:
            keys, a, g = self.copy(h, batch.tokens, batch.history, self.token_emb)
            p_copy = CopyHead.target_prob(keys, a, targets)[keep]
            return -mix_log_probs(self.target_log_probs(hk, y), p_copy, g[keep]).mean()
        kind = self.loss_kind()
        if kind == "full":
            return F.cross_entropy(self.logits(hk), y)
        if kind == "chunked":
            return chunked_cross_entropy(hk, y, self.output_weight, self.out_bias)
        return sampled_softmax_loss(hk, y, self.output_weight, self.out_bias, self.cfg.n_negatives)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        h = self.hidden(batch)
        gen = self.generative_loss(h, batch)
        extra, parts = self.extra_loss(batch, h)
        parts = {"gen": float(gen.detach()), **parts}
        total = gen
        if extra is not None:
            lam = self.cfg.contrastive_lambda
            total = (1 - lam) * gen + lam * extra
        if self.field_heads is not None and batch.target_codes is not None:
            fl, _ = self.field_heads.loss(h, batch.target_codes)
            total = total + self.cfg.field_loss_weight * fl
            parts |= {"fields": float(fl.detach())}
        return total, parts

    def embed(self, batch: Batch) -> torch.Tensor:
        """(B, D) user embedding: the mean of the causal states over real positions."""
        return mean_states(self.hidden(batch), batch.mask)


def mean_states(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D) states, (B, T) bool -> (B, D): the mean over real positions (the user embedding, and what
    PANTHER's history / self contrastive terms compare)."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def chunked_cross_entropy(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          chunk: int = 2048, reduction: str = "mean") -> torch.Tensor:
    """Exact full-softmax cross-entropy, computed `chunk` positions at a time to bound memory
    (`reduction = "none"`: (N,) per position)."""
    parts = [F.cross_entropy(h[i:i + chunk] @ weight.t() + bias, y[i:i + chunk], reduction="none")
             for i in range(0, h.shape[0], chunk)]
    per = torch.cat(parts) if parts else h.new_zeros(0)
    return per if reduction == "none" else per.sum() / max(h.shape[0], 1)


def sampled_softmax_loss(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         n_negatives: int, reduction: str = "mean") -> torch.Tensor:
    """Sampled softmax: the target against `n_negatives` ids drawn uniformly (shared by the batch).

    Uniform sampling makes the log-Q correction a constant, so it cancels; a negative equal to a
    row's target (an accidental hit) is masked out. Special ids (< N_SPECIAL) are never drawn.
    """
    vocab = weight.shape[0]
    neg = torch.randint(N_SPECIAL, vocab, (min(n_negatives, max(vocab - N_SPECIAL, 1)),), device=h.device)
    pos_logit = (h * weight[y]).sum(-1, keepdim=True) + bias[y].unsqueeze(-1)  # (N, 1)
    neg_logit = h @ weight[neg].t() + bias[neg]  # (N, K)
    neg_logit = neg_logit.masked_fill(neg.unsqueeze(0) == y.unsqueeze(1), -math.inf)
    logits = torch.cat([pos_logit, neg_logit], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(y), reduction=reduction)


class CountModel(SequenceModel):
    """A model fitted by counting: `observe(batch)` once per training batch, no gradients."""

    trainable = False

    def __init__(self, cfg: ModelConfig, info: DataInfo):
        super().__init__()
        self.cfg, self.info = cfg, info

    def observe(self, batch: Batch) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Called once after the counting pass (e.g. to compact the counts)."""

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy of the current counts (for logging only: count models take no steps)."""
        s = self.scores(batch)
        keep = batch.targets != PAD
        logp = torch.log_softmax(s[keep], dim=-1)
        nll = -logp.gather(1, batch.targets[keep].unsqueeze(1)).mean()
        return nll, {"gen": float(nll)}
