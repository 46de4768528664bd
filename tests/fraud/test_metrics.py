"""Fraud metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pantherseq.fraud.metrics import (
    average_precision,
    card_precision_at_k,
    fraud_metrics,
    hits_in_top,
    recall_at_top,
    roc_auc,
    top_k_count,
)

SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
LABELS = np.array([1, 0, 1, 0, 0, 1, 0, 0, 0, 0])  # frauds at ranks 1, 3 and 6


def test_average_precision_by_hand():
    # precision at each fraud: 1/1, 2/3, 3/6 -> mean
    assert average_precision(SCORES, LABELS) == pytest.approx((1 + 2 / 3 + 0.5) / 3)


def test_average_precision_groups_ties():
    # one threshold group of 2 (1 fraud) then another (1 fraud): 0.5 * 0.5 + 0.5 * 0.5
    assert average_precision(np.array([1, 1, 0, 0.0]), np.array([1, 0, 1, 0])) == pytest.approx(0.5)


def test_roc_auc_by_hand():
    # 0.9 beats all 7 genuine, 0.7 beats 6, 0.4 beats 4: 17 of 21 pairs
    assert roc_auc(SCORES, LABELS) == pytest.approx(17 / 21)
    assert roc_auc(np.array([1, 1, 0.0]), np.array([1, 0, 0])) == pytest.approx(0.75)  # a tie is 1/2
    assert math.isnan(roc_auc(SCORES, np.zeros(10)))


def test_recall_at_top_by_hand():
    assert top_k_count(10, 10) == 1 and top_k_count(517_457, 0.1) == 517 and top_k_count(5, 1) == 1
    assert recall_at_top(SCORES, LABELS, 10) == pytest.approx(1 / 3)
    assert recall_at_top(SCORES, LABELS, 30) == pytest.approx(2 / 3)
    assert recall_at_top(SCORES, LABELS, 60) == pytest.approx(1.0)


def test_ties_at_the_cut_are_shared_pro_rata():
    s, y = np.array([1, 1, 1, 1, 0.0]), np.array([1, 0, 0, 0, 0])
    assert hits_in_top(s, y.astype(bool), 1) == pytest.approx(0.25)
    assert recall_at_top(s, y, 20) == pytest.approx(0.25)  # a constant-ish scorer earns only its share
    assert recall_at_top(np.zeros(100), np.r_[np.ones(10), np.zeros(90)], 5) == pytest.approx(0.05)


def test_recall_of_a_subset_uses_the_same_top_set():
    scenario = np.array([1, 0, 2, 0, 0, 2, 0, 0, 0, 0])
    assert recall_at_top(SCORES, LABELS, 30, subset=scenario == 2) == pytest.approx(0.5)
    assert recall_at_top(SCORES, LABELS, 30, subset=scenario == 1) == pytest.approx(1.0)


def test_card_precision_by_hand():
    s = np.array([0.9, 0.8, 0.1, 0.05, 0.2, 0.5, 0.3])
    y = np.array([1, 0, 1, 0, 0, 1, 0])
    cust = np.array(["A", "B", "C", "A", "A", "B", "C"])
    day = np.array([1, 1, 1, 1, 2, 2, 3])
    # day 1: A max .9 (fraud), B .8, C .1 (fraud); day 2: B .5 (fraud), A .2; day 3: C .3 (clean)
    assert card_precision_at_k(s, y, cust, day, k=1) == pytest.approx((1 + 1 + 0) / 3)
    assert card_precision_at_k(s, y, cust, day, k=2) == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    # fewer customers than k on a day: the share among those there are
    assert card_precision_at_k(s, y, cust, day, k=3) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


def test_fraud_metrics_row():
    scenario = np.array([1, 0, 2, 0, 0, 2, 0, 0, 0, 0])
    row = fraud_metrics(SCORES, LABELS, np.arange(10) % 3, np.zeros(10), scenario, card_k=2)
    assert set(row) >= {"recall@0.01%", "recall@0.1%", "recall@1%", "recall@5%", "average_precision",
                        "roc_auc", "card_precision@2", "recall@1%_by_scenario"}
    assert row["recall@1%"] == pytest.approx(1 / 3)
    assert row["recall@1%_by_scenario"] == {"1": pytest.approx(1.0), "2": pytest.approx(0.0)}
    assert row["n"] == 10 and row["frauds"] == 3
