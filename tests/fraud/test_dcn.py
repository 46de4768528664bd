"""The DCN-v2 risk head: learns a feature interaction trees would need many splits for; plugs into run_fraud."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pantherseq.fraud.dcn import DCNConfig, fit_dcn
from pantherseq.fraud.metrics import roc_auc
from pantherseq.fraud.pipeline import FraudConfig, run_fraud
from stolen_routine import PERIODS


def test_dcn_learns_an_interaction_and_handles_missing_values():
    rng = np.random.default_rng(0)
    n = 6000
    a, b, c = rng.normal(size=n), rng.normal(size=n), rng.normal(size=n)
    y = (a * b + 0.3 * rng.normal(size=n) > 1.2).astype(np.int8)  # about 10% positive
    c[rng.random(n) < 0.3] = np.nan
    X = pl.DataFrame({"a": a, "b": b, "c": c})
    t = np.arange(n)
    model = fit_dcn(X[:4000], y[:4000], t[:4000], DCNConfig(max_epochs=8, batch_size=256, hidden=[64, 32]))
    s = model.predict(X[4000:])
    assert s.shape == (2000,) and np.isfinite(s).all()
    assert roc_auc(s, y[4000:]) > 0.85


@pytest.mark.slow
def test_run_fraud_with_the_dcn_head(trained_run, tmp_path):
    cfg = FraudConfig(**PERIODS, context=24, risk_model="dcn", feature_sets=["hybrid"], out_dir=str(tmp_path),
                      dcn=DCNConfig(max_epochs=8, hidden=[64, 32]))
    report = run_fraud(trained_run, "panther", cfg)
    assert (tmp_path / "risk_model_hybrid.pt").is_file()
    row = report["feature_sets"]["hybrid"]
    assert 0.0 <= row["roc_auc"] <= 1.0 and row["frauds"] > 100  # learning is checked on the synthetic task
