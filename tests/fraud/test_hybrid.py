"""The risk model's early-stopping split: later than the fit slice and sharing no customer with it."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pantherseq.errors import ConfigError
from pantherseq.fraud.hybrid import LGBMConfig, early_stopping_split, fit_risk_model, risk_split


def rows(n: int = 3000, customers: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, 60, n))
    customer = np.array([f"c{i:03d}" for i in rng.integers(0, customers, n)])
    y = (rng.random(n) < 0.03).astype(np.int8)
    return t, y, customer


def test_the_slices_share_no_customer_and_the_early_stopping_one_is_later():
    t, y, customer = rows()
    fit, valid = early_stopping_split(t, y, customer, 0.2, 0.5, seed=0)
    assert set(customer[fit]).isdisjoint(customer[valid])
    assert t[valid].min() >= t[fit].max()
    assert y[fit].sum() > 0 and y[valid].sum() > 0
    late = t >= np.sort(t)[int(0.8 * len(t))]
    assert set(valid) <= set(np.flatnonzero(late)) and 0.3 < len(valid) / late.sum() < 0.7
    again = early_stopping_split(t, y, customer, 0.2, 0.5, seed=0)
    assert np.array_equal(again[0], fit) and np.array_equal(again[1], valid)  # deterministic by seed


def test_the_held_out_customers_include_late_fraud_customers():
    t, y, customer = rows(seed=1)
    y[:] = 0
    y[-5:] = 1  # one late fraud customer only: it lands in the early-stopping slice, not in the fit slice
    customer[-5:] = "victim"
    fit, valid = early_stopping_split(t, y, customer, 0.2, 0.5, seed=3)
    assert y[valid].sum() == 5 and "victim" not in set(customer[fit])


def test_one_fraud_customer_alone_falls_back_to_the_time_split():
    t, y, customer = rows(seed=4)
    y[:] = 0
    y[[100, 200, -3, -2]] = 1  # every fraud is one customer's, early and late: no disjoint slices have both
    customer[[100, 200, -3, -2]] = "victim"
    fit, valid, disjoint = risk_split(t, y, customer, LGBMConfig())
    assert not disjoint and y[fit].sum() == 2 and y[valid].sum() == 2 and t[valid].min() >= t[fit].max()
    y[-3:] = 0
    with pytest.raises(ConfigError):
        risk_split(t, y, customer, LGBMConfig())  # no late fraud at all


def test_without_customers_the_split_is_by_time_only():
    t, y, _ = rows()
    fit, valid = early_stopping_split(t, y, None, 0.25, 0.5)
    assert len(fit) + len(valid) == len(t) and t[valid].min() >= t[fit].max()
    assert len(valid) == len(t) - int(len(t) * 0.75)


def learnable(seed: int, offset: float = 5.0):
    """4,000 rows of 300 customers whose fraud follows a logistic in column x (fewer frauds as `offset`
    grows: 8 % at 5, 2 % at 7): (X, y, t, customer, x)."""
    t, _, customer = rows(4000, 300, seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=len(t))
    y = (rng.random(len(t)) < 1 / (1 + np.exp(-(3 * x - offset)))).astype(np.int8)
    return pl.DataFrame({"x": x, "noise": rng.normal(size=len(t))}), y, t, customer, x


def test_fit_records_the_customer_disjoint_slices():
    X, y, t, customer, x = learnable(2)
    cfg = LGBMConfig(max_rounds=50, early_stopping=10, min_child_samples=20)
    model = fit_risk_model(X, y, t, cfg, customer=customer)
    info = model.info
    assert info["customer_disjoint"] and info["valid_frauds"] > 0
    assert info["fit_rows"] + info["valid_rows"] < len(t)  # the held-out customers' early rows are unused
    assert np.corrcoef(model.predict(X), x)[0, 1] > 0.5


@pytest.mark.parametrize("change", [{"valid_customers": 1.0}, {"valid_share": 0.0}])
def test_bad_split_shares_are_refused(change):
    with pytest.raises(ConfigError):
        LGBMConfig(**change).validate("lgbm")


def test_early_stopping_is_on_log_loss_and_records_the_ap_beside_it():
    X, y, t, customer, _ = learnable(4, offset=7)  # 2 % frauds, positives weighted ~7x
    by = {}
    for metric in ("binary_logloss", "average_precision"):
        cfg = LGBMConfig(max_rounds=60, early_stopping=10, min_child_samples=20, stopping_metric=metric)
        info = fit_risk_model(X, y, t, cfg, customer=customer).info
        assert info["stopping_metric"] == metric
        assert info["valid_logloss"] > 0 and 0 < info["valid_average_precision"] <= 1
        by[metric] = info
    # the stopping log-loss is weighted as the objective is (with an unweighted one and `scale_pos_weight`
    # these rows stopped at round 6; the handbook's at round 1)
    assert by["binary_logloss"]["best_iteration"] > 15, by
    assert LGBMConfig().stopping_metric == "binary_logloss"
    with pytest.raises(ConfigError, match="stopping_metric"):
        LGBMConfig(stopping_metric="auc").validate("lgbm")
