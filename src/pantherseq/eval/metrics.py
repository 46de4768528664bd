"""Metrics, pure functions tested against hand-worked values: next-behaviour ranking metrics (SPEC §6) of
per-example ranks, aggregated by sum and count, and the binary-classification metrics every user-level probe
and fraud table reports (ROC-AUC, average precision).

A rank is 1-based and pessimistic about ties: the number of candidates scored at least as high as the
target, the target included. No model gains from ties (a constant scorer ranks every target last), and
it takes one pass over the score matrix. Special tokens (PAD, UNK, BOS, PROFILE) are never candidates.
"""

from __future__ import annotations

import numpy as np
import torch

from pantherseq.data.schema import N_SPECIAL

KS = (1, 5, 10)
NDCG_KS = (5, 10)
METRICS = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr")


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


# -- binary classification (fraud, user-level probes) -------------------------------------------------
def check_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must be 1-D and of the same length")
    return s, y


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Σ_n (R_n − R_{n−1}) · P_n over the distinct score thresholds, highest first (sklearn's definition)."""
    s, y = check_scores(scores, labels)
    if not y.any():
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the end of each group of equal scores
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1.0)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a random fraud > score of a random genuine one), ties counting 1/2 (mid-ranks)."""
    s, y = check_scores(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    first = np.r_[0, np.flatnonzero(np.diff(sorted_s) != 0) + 1]
    size = np.diff(np.r_[first, len(s)])
    mid = first + (size + 1) / 2.0  # 1-based mid-rank of each tie group
    ranks[order] = np.repeat(mid, size)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
