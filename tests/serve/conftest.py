"""A served run: the stolen-routine run's tiny PANTHER, its hybrid risk model computed offline with the
service's window (context = max_len − 1) and every user's state embedded as of the test period's start."""

from __future__ import annotations

from pathlib import Path

import pytest

from pantherseq.fraud.hybrid import LGBMConfig
from pantherseq.fraud.pipeline import FraudConfig, run_fraud
from pantherseq.serve.embed import embed_users
from pantherseq.serve.scorer import Scorer
from pantherseq.store import open_store
from stolen_routine import PERIODS

LGBM = LGBMConfig(max_rounds=200, early_stopping=30, learning_rate=0.1, min_child_samples=20, refit=False)


@pytest.fixture(scope="session")
def served(trained_run: Path, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("served")
    fraud_dir = root / "fraud"
    periods = {**PERIODS, "test_end": "2024-02-27"}  # three test days: the offline pass at chunk 1 is slow
    cfg = FraudConfig(**periods, context=47, embedding_dims=4, feature_sets=["baseline", "baseline+robust_z", "hybrid"],
                      lgbm=LGBM, save_features=True,  # the parity test compares every feature too
                      out_dir=str(fraud_dir))
    report = run_fraud(trained_run, "panther", cfg)
    om = Scorer(trained_run, "panther", fraud_dir)
    url = f"sqlite:///{root / 'states.db'}"
    with open_store(url) as store:
        meta = embed_users(om, store, PERIODS["test_start"], progress=False)
    return {"run": trained_run, "fraud_dir": fraud_dir, "report": report, "url": url, "meta": meta, "root": root}


from store.conftest import redis_url  # noqa: F401 (a throwaway redis-server for the replicas test)
