"""Count baselines: `popular` (global frequency) and `markov` (first-order transitions with back-off).

Fitted by counting the same training batches the neural models see (`observe`), one pass; no gradients.
Counts are buffers, so they travel in the state_dict like any weight.
"""

from __future__ import annotations

import torch

from pantherseq.model.base import PAD, Batch, CountModel, DataInfo, ModelConfig


class Popular(CountModel):
    """Scores every token by its training frequency as a target, whatever the history."""

    def __init__(self, cfg: ModelConfig, info: DataInfo):
        super().__init__(cfg, info)
        self.register_buffer("counts", torch.zeros(info.vocab_size, dtype=torch.float64))

    def observe(self, batch: Batch) -> None:
        y = batch.targets[batch.targets != PAD]
        self.counts += torch.bincount(y, minlength=self.info.vocab_size).double()

    def scores(self, batch: Batch) -> torch.Tensor:
        B, T = batch.tokens.shape
        return torch.log1p(self.counts).float().expand(B, T, -1)

    def target_scores(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        keep = batch.targets != PAD
        n = int(keep.sum())
        return torch.log1p(self.counts).float().expand(n, -1), batch.targets[keep]


class Markov(Popular):
    """P(next | current) from transition counts, backed off to popularity: counts[cur] + w * prior.

    A dense V x V table; for vocabularies too large for that (V > 20,000) it refuses to build.
    """

    MAX_VOCAB = 20_000

    def __init__(self, cfg: ModelConfig, info: DataInfo):
        if info.vocab_size > self.MAX_VOCAB:
            raise ValueError(f"markov keeps a dense {info.vocab_size}^2 table: vocabulary above "
                             f"{self.MAX_VOCAB:,} is too large; lower tokenizer.top_k")
        super().__init__(cfg, info)
        self.register_buffer("transitions", torch.zeros(info.vocab_size, info.vocab_size))

    def observe(self, batch: Batch) -> None:
        super().observe(batch)
        keep = batch.targets != PAD
        cur, nxt = batch.tokens[keep], batch.targets[keep]
        flat = cur * self.info.vocab_size + nxt
        self.transitions.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))

    def _from_current(self, current: torch.Tensor) -> torch.Tensor:
        """(...,) current tokens -> (..., V) log P(next | current), backed off to popularity."""
        prior = (self.counts / self.counts.sum().clamp_min(1)).float()  # (V,)
        rows = self.transitions[current]  # (..., V)
        total = rows.sum(-1, keepdim=True)
        w = self.cfg.markov_backoff
        return torch.log((rows + w * prior) / (total + w))

    def scores(self, batch: Batch) -> torch.Tensor:
        return self._from_current(batch.tokens)

    def target_scores(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        keep = batch.targets != PAD
        return self._from_current(batch.tokens[keep]), batch.targets[keep]
