"""Count baselines: `popular` (global frequency), `markov` (first-order transitions with back-off) and
`personal` (the user's own token frequency among earlier events, ties by training popularity).

Fitted by counting the same training batches the neural models see (`observe`), one pass; no gradients.
Counts are buffers, so they travel in the state_dict like any weight. The transition table is sparse
(sorted (current, next) keys with counts), so a 60,000-token vocabulary costs memory in proportion to the
transitions actually seen, not V².
"""

from __future__ import annotations

import torch

from pantherseq.data.schema import N_SPECIAL, PAD
from pantherseq.model.base import Batch, CountModel, DataInfo, ModelConfig


class Popular(CountModel):
    """Scores every token by its training frequency as a target, whatever the history."""

    def __init__(self, cfg: ModelConfig, info: DataInfo):
        super().__init__(cfg, info)
        self.register_buffer("counts", torch.zeros(info.vocab_size, dtype=torch.float64))

    def observe(self, batch: Batch) -> None:
        y = batch.targets[batch.targets != PAD]
        self.counts += torch.bincount(y, minlength=self.info.vocab_size).double()

    def prior(self) -> torch.Tensor:
        """(V,) float32 training frequency of each token as a target."""
        return (self.counts / self.counts.sum().clamp_min(1)).float()

    def _from_current(self, current: torch.Tensor) -> torch.Tensor:
        return torch.log1p(self.counts).float().expand(*current.shape, -1)

    def scores(self, batch: Batch) -> torch.Tensor:
        return self._from_current(batch.tokens)

    def target_scores(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        keep = batch.targets != PAD
        return self._from_current(batch.tokens[keep]), batch.targets[keep]


class Markov(Popular):
    """log P(next | current) = log((count(current, next) + w · prior(next)) / (count(current) + w))."""

    def __init__(self, cfg: ModelConfig, info: DataInfo):
        super().__init__(cfg, info)
        self.register_buffer("keys", torch.zeros(0, dtype=torch.long))  # sorted current * V + next
        self.register_buffer("pair_counts", torch.zeros(0))
        self._pending: list[torch.Tensor] = []

    def observe(self, batch: Batch) -> None:
        super().observe(batch)
        keep = batch.targets != PAD
        self._pending.append(batch.tokens[keep] * self.info.vocab_size + batch.targets[keep])

    def finish(self) -> None:
        self._merge()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("keys", "pair_counts"):  # their size is the number of distinct transitions
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _merge(self) -> None:
        if not self._pending:
            return
        keys = torch.cat([self.keys.repeat_interleave(self.pair_counts.long()), *self._pending])
        self._pending = []
        self.keys, counts = torch.unique(keys, sorted=True, return_counts=True)
        self.pair_counts = counts.float()

    def _from_current(self, current: torch.Tensor) -> torch.Tensor:
        self._merge()
        V = self.info.vocab_size
        flat = current.reshape(-1)  # (N,)
        rows = self.cfg.markov_backoff * self.prior().expand(flat.numel(), V).clone()  # (N, V)
        row_of_key = self.keys // V
        lo = torch.searchsorted(row_of_key, flat)
        hi = torch.searchsorted(row_of_key, flat, right=True)
        n = hi - lo
        totals = torch.zeros(flat.numel())
        if int(n.sum()):
            which = torch.repeat_interleave(torch.arange(flat.numel()), n)  # row of each entry
            offset = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
            entry = torch.repeat_interleave(lo, n) + offset
            rows[which, self.keys[entry] % V] += self.pair_counts[entry]
            totals.index_add_(0, which, self.pair_counts[entry])
        out = torch.log(rows / (totals + self.cfg.markov_backoff).unsqueeze(1))
        return out.reshape(*current.shape, V)


class Personal(Popular):
    """Personal frequency: a token's score is how often the user produced it among the events before the
    target — the window's inputs and the `history` events before the window (cfg.history) — each weighted
    decay^k for an event k events back (cfg.personal_decay; 1 = plain counts), plus the training popularity
    scaled far below one event's weight, so ties (and users with no history) fall back to `popular`."""

    @property
    def history_len(self) -> int:
        return int(self.cfg.history)

    def _personal(self, batch: Batch, keep: torch.Tensor) -> torch.Tensor:
        """(N, V) scores at the positions `keep` (B, T)."""
        tokens = batch.tokens
        B, T = tokens.shape
        hist = batch.history if batch.history is not None else tokens.new_zeros((B, 0))
        keys = torch.cat([hist, tokens], dim=1)  # (B, K)
        pos_k = torch.arange(-hist.shape[1], T)
        dist = torch.arange(T).unsqueeze(1) - pos_k.unsqueeze(0)  # (T, K): events back from each position
        visible = (dist >= 0).unsqueeze(0) & (keys >= N_SPECIAL).unsqueeze(1)  # (B, T, K)
        weight = torch.float_power(torch.tensor(float(self.cfg.personal_decay)), dist.clamp_min(0)).unsqueeze(0)
        w = (visible * weight)[keep]  # (N, K) float64
        rows = torch.arange(B).unsqueeze(1).expand(B, T)[keep]
        counts = torch.zeros((w.shape[0], self.info.vocab_size), dtype=torch.float64)
        counts.scatter_add_(1, keys[rows], w)
        prior = (self.counts / self.counts.sum().clamp_min(1)).unsqueeze(0)  # (1, V), sums to 1
        return (counts + 1e-6 * prior).float()

    def scores(self, batch: Batch) -> torch.Tensor:
        keep = torch.ones_like(batch.tokens, dtype=torch.bool)
        return self._personal(batch, keep).reshape(*batch.tokens.shape, -1)

    def target_scores(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        keep = batch.targets != PAD
        return self._personal(batch, keep), batch.targets[keep]

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """The scores are non-negative weights (counts + a small prior): normalised, not a softmax."""
        return scores / scores.sum(-1, keepdim=True).clamp_min(1e-30)
