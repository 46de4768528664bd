"""Next-behaviour metrics (SPEC §6): pure functions of per-example ranks, aggregated by sum and count.

A rank is 1-based and pessimistic about ties: the number of candidates scored at least as high as the
target, the target included. No model gains from ties (a constant scorer ranks every target last), and
it takes one pass over the score matrix. Special tokens (PAD, UNK, BOS, PROFILE) are never candidates.
"""

from __future__ import annotations

import torch

KS = (1, 5, 10)
NDCG_KS = (5, 10)
METRICS = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr")
N_SPECIAL = 4  # equals tokenizer.N_SPECIAL


def ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: int = N_SPECIAL) -> torch.Tensor:
    """scores (N, V), targets (N,) -> (N,) int64 1-based ranks of the targets among ids >= exclude."""
    t = scores.gather(1, targets.unsqueeze(1))  # (N, 1)
    return (scores[:, exclude:] >= t).sum(1)


def per_example(r: torch.Tensor) -> dict[str, torch.Tensor]:
    """(N,) ranks -> {metric: (N,) float64 per-example values}."""
    r = r.double()
    out = {f"hr@{k}": (r <= k).double() for k in KS}
    for k in NDCG_KS:
        out[f"ndcg@{k}"] = torch.where(r <= k, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r))
    out["mrr"] = 1.0 / r
    return out


class MetricSum:
    """Running sums and the count: add per-example values batch by batch, all-reduce, then mean."""

    def __init__(self):
        self.sums = {m: 0.0 for m in METRICS}
        self.n = 0

    def add(self, r: torch.Tensor) -> None:
        for name, values in per_example(r).items():
            self.sums[name] += float(values.sum())
        self.n += int(r.numel())

    def tensor(self) -> torch.Tensor:
        return torch.tensor([*(self.sums[m] for m in METRICS), float(self.n)], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> MetricSum:
        out = cls()
        out.sums = {m: float(v) for m, v in zip(METRICS, t[:-1].tolist())}
        out.n = int(t[-1])
        return out

    def result(self) -> dict[str, float]:
        res = {m: (self.sums[m] / self.n if self.n else 0.0) for m in METRICS}
        return {**res, "n": self.n}
