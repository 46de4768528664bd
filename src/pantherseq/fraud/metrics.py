"""Fraud metrics (SPEC §7): pure NumPy functions of scores and labels, each tested against hand-worked values.

    recall_at_top(scores, labels, pct)     share of all frauds among the top pct % of transactions by score
    average_precision, roc_auc             (eval/metrics.py, re-exported)
    card_precision_at_k(scores, labels, customer, day, k)
                                           per day: the k customers with the highest max score, share
                                           truly compromised that day (any fraud that day); mean over days
    fraud_metrics(...)                     the table row of `fraud.json`, recall@1% per scenario included

Ties never help a scorer: at the cut-off of a top-K set, the tied transactions are counted at the share
of frauds among them (the expected value under a random order), so a constant scorer gets recall K%.
The top-K set holds floor(pct / 100 · N) transactions (at least one), which is why Recall@Top-0.1% is
capped by (0.1% of N) / frauds when the fraud rate is above 0.1%.
"""

from __future__ import annotations

import numpy as np

from pantherseq.eval.metrics import average_precision, check_scores, roc_auc

TOP_PCTS = (0.01, 0.1, 1.0, 5.0)
# the columns every fraud table shows (terminal, report): the operating points, AP, ROC-AUC
TABLE_COLUMNS = (*(f"recall@{p:g}%" for p in TOP_PCTS), "average_precision", "roc_auc")


def scenario_ids(sets: dict[str, dict]) -> list[str]:
    """The fraud scenario ids (string keys) any feature set of fraud.json has a recall@1% for, in order."""
    return sorted({s for r in sets.values() for s in r.get("recall@1%_by_scenario", {})}, key=int)


def top_k_count(n: int, pct: float) -> int:
    """Transactions in the top pct % of n: floor(pct / 100 · n), at least 1."""
    return max(1, int(np.floor(pct / 100.0 * n + 1e-9)))


def hits_in_top(scores: np.ndarray, positives: np.ndarray, k: int) -> float:
    """Expected number of positives among the k highest scores (ties at the cut-off shared pro rata)."""
    s, y = check_scores(scores, positives)
    if k <= 0 or len(s) == 0:
        return 0.0
    k = min(k, len(s))
    thr = np.partition(s, len(s) - k)[len(s) - k]  # the k-th highest score
    above = s > thr
    at = s == thr
    slots = k - int(above.sum())
    return float(y[above].sum()) + slots * float(y[at].sum()) / float(at.sum())


def recall_at_top(scores: np.ndarray, labels: np.ndarray, pct: float,
                  subset: np.ndarray | None = None) -> float:
    """Share of the frauds (of `subset` of them, e.g. one scenario) among the top pct % of all transactions."""
    s, y = check_scores(scores, labels)
    target = y if subset is None else (y & np.asarray(subset, dtype=bool))
    if not target.any():
        return float("nan")
    return hits_in_top(s, target, top_k_count(len(s), pct)) / float(target.sum())


def card_precision_at_k(scores: np.ndarray, labels: np.ndarray, customer: np.ndarray, day: np.ndarray,
                        k: int = 100) -> float:
    """Mean over days of: share of compromised customers among the day's k customers with the highest
    max score (a customer is compromised on a day when any of their transactions that day is fraud).
    Ties among customers are broken by the customer id, so the value is deterministic."""
    s, y = check_scores(scores, labels)
    customer, day = np.asarray(customer), np.asarray(day)
    if len(s) == 0:
        return float("nan")
    _, cust = np.unique(customer, return_inverse=True)
    _, d = np.unique(day, return_inverse=True)
    key = d.astype(np.int64) * (int(cust.max()) + 1) + cust
    uniq, inv = np.unique(key, return_inverse=True)  # one row per (day, customer)
    best = np.full(len(uniq), -np.inf)
    np.maximum.at(best, inv, s)
    bad = np.zeros(len(uniq), dtype=bool)
    np.logical_or.at(bad, inv, y)
    pair_day = uniq // (int(cust.max()) + 1)
    out = []
    for dd in np.unique(pair_day):
        rows = np.flatnonzero(pair_day == dd)
        top = rows[np.argsort(-best[rows], kind="stable")[:k]]
        out.append(bad[top].sum() / float(min(k, len(rows))))
    return float(np.mean(out))


def fraud_metrics(scores: np.ndarray, labels: np.ndarray, customer: np.ndarray, day: np.ndarray,
                  scenario: np.ndarray | None = None, card_k: int = 100) -> dict:
    """One row of `fraud.json`: recall@K% for K in TOP_PCTS, AP, ROC-AUC, card precision@k, recall@1% per
    scenario (scenario ids > 0 present among the frauds; keys are their string ids)."""
    s, y = check_scores(scores, labels)
    out: dict = {f"recall@{_pct(p)}%": recall_at_top(s, y, p) for p in TOP_PCTS}
    out["average_precision"] = average_precision(s, y)
    out["roc_auc"] = roc_auc(s, y)
    out[f"card_precision@{card_k}"] = card_precision_at_k(s, y, customer, day, card_k)
    if scenario is not None:
        sc = np.asarray(scenario)
        out["recall@1%_by_scenario"] = {str(int(v)): recall_at_top(s, y, 1.0, sc == v)
                                        for v in np.unique(sc[y]) if v > 0}
    out["n"], out["frauds"] = len(s), int(y.sum())
    return out


def _pct(p: float) -> str:
    return f"{p:g}"
