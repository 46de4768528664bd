"""End to end on the stolen-routine run: the hybrid must beat the baseline, and lose that edge when the
behaviour features are shuffled (so the check can fail); outputs, protocol checks and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest

from pantherseq.cli import main
from pantherseq.errors import ConfigError, DataError
from pantherseq.fraud.hybrid import GROUPS, LGBMConfig, fit_risk_model
from pantherseq.fraud.metrics import recall_at_top, roc_auc
from pantherseq.fraud.pipeline import FraudConfig, load_fraud_config, run_fraud
from stolen_routine import PERIODS

pytestmark = pytest.mark.slow  # the whole fraud stage end to end (make test runs it; the fast loop does not)

# refit as by default: the early-stopping slice holds out half of the customers, whose rows the fit slice lacks
LGBM = LGBMConfig(max_rounds=200, early_stopping=30, learning_rate=0.1, min_child_samples=20)


def config(**kw) -> FraudConfig:
    return FraudConfig(**{**PERIODS, "context": 24, "lgbm": LGBM, **kw})


@pytest.fixture(scope="module")
def report(trained_run):
    return run_fraud(trained_run, "panther", config(save_features=True))


def test_hybrid_beats_baseline_on_stolen_routines(report):
    sets = report["feature_sets"]
    base, hybrid = sets["baseline"], sets["hybrid"]
    assert report["rows"]["test_frauds"] > 150
    # each stolen event looks ordinary: the hand-made features are near chance
    assert base["roc_auc"] < 0.65
    assert hybrid["roc_auc"] > base["roc_auc"] + 0.15
    assert hybrid["recall@5%"] > 2 * base["recall@5%"] + 0.05
    assert hybrid["average_precision"] > 2 * base["average_precision"]
    # Δ adds to the hand-made robust amount deviation too (a stolen routine's amounts are the victim's own)
    robust, both = sets["baseline+robust_z"], sets["baseline+robust_z+deviation"]
    assert both["recall@5%"] > 2 * robust["recall@5%"] + 0.05
    assert both["average_precision"] > 2 * robust["average_precision"]


def test_the_edge_disappears_when_behaviour_features_are_shuffled(trained_run, report):
    frame = pl.read_parquet(trained_run / "fraud" / "features.parquet").filter(pl.col("label").is_in([0, 1]))
    groups = report["feature_groups"]
    behaviour = groups["deviation"] + groups["embedding"]
    rng = np.random.default_rng(0)
    shuffled = frame.with_columns(pl.col(c).gather(rng.permutation(frame.height)) for c in behaviour)
    cols = [c for g in GROUPS["hybrid"] for c in groups[g]]
    train = shuffled.filter(pl.col("period") == "train")
    test = shuffled.filter(pl.col("period") == "test")
    model = fit_risk_model(train.select(cols), train["label"].to_numpy(), train["timestamp"].to_numpy(), LGBM,
                           report["categorical"])
    s, y = model.predict(test.select(cols)), test["label"].to_numpy()
    base = report["feature_sets"]["baseline"]
    assert roc_auc(s, y) < base["roc_auc"] + 0.15
    assert recall_at_top(s, y, 5.0) < 2 * base["recall@5%"] + 0.05


def test_outputs(trained_run, report):
    out = trained_run / "fraud"
    saved = json.loads((out / "fraud.json").read_text())
    assert set(saved["feature_sets"]) == {
        "baseline", "baseline+robust_z", "baseline+embedding", "baseline+deviation", "baseline+robust_z+deviation",
        "hybrid"}
    row = saved["feature_sets"]["hybrid"]
    for key in ("recall@0.01%", "recall@0.1%", "recall@1%", "recall@5%", "average_precision", "roc_auc",
                "card_precision@100", "recall@1%_by_scenario"):
        assert key in row
    scores = pl.read_parquet(out / "scores.parquet")
    assert scores.height == saved["rows"]["test"] and "score_hybrid" in scores.columns
    assert scores["timestamp"].min() >= pl.Series([PERIODS["test_start"]]).str.to_datetime()[0]
    assert (out / "risk_model_hybrid.txt").is_file() and (out / "merchant_risk.parquet").is_file()
    imp = pl.read_parquet(out / "importances.parquet")
    assert set(imp["feature_set"].unique()) == set(saved["feature_sets"])
    risk = pl.read_parquet(out / "merchant_risk.parquet")
    assert {"merchant_id", "users", "risk", "median", "mad", "risk_z", "high_risk"} <= set(risk.columns)
    assert saved["embedding"] == {"embedding_dims": 16, "state_dims": 32, "dims_per_state": 16, "columns": 32,
                                  "reduction": "PCA"}


def test_a_risk_period_the_generative_model_trained_on_is_refused(trained_run):
    with pytest.raises(ConfigError, match="in-sample"):
        run_fraud(trained_run, "panther", config(train_start="2024-01-10"))


def test_bad_input_is_one_line_and_exit_2(trained_run, tmp_path, capsys):
    with pytest.raises(ConfigError, match="pretrain"):
        run_fraud(trained_run, "transformer", config())
    bare = tmp_path / "bare"
    shutil.copytree(trained_run, bare, ignore=shutil.ignore_patterns("fraud"))
    pl.read_parquet(bare / "events.parquet").drop("label").write_parquet(bare / "events.parquet")
    with pytest.raises(DataError, match="no fraud labels"):
        run_fraud(bare, "panther", config())
    assert main(["fraud", "--run", str(bare), "--model", "panther"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pantherseq fraud: error:") and "\n" not in err
    assert main(["fraud", "--run", str(tmp_path / "nowhere"), "--model", "panther"]) == 2
    assert main(["fraud", "--run", str(trained_run), "--set", "feature_sets=[\"nope\"]"]) == 2


def test_config_file_takes_toml_dates_and_rejects_unknown_keys(tmp_path):
    path = tmp_path / "fraud.toml"
    path.write_text('train_start = 2024-01-29\ntest_start = "2024-02-24"\n[lgbm]\nmax_rounds = 5\n')
    cfg = load_fraud_config(path, ["train_end=2024-02-17"])
    assert (cfg.train_start, cfg.train_end, cfg.test_start) == ("2024-01-29", "2024-02-17", "2024-02-24")
    assert cfg.lgbm.max_rounds == 5
    path.write_text("test_begin = 2024-02-24\n")
    with pytest.raises(ConfigError, match="valid keys"):
        load_fraud_config(path)


def test_baseline_only_skips_the_model_pass(trained_run, tmp_path):
    report = run_fraud(trained_run, "panther", config(feature_sets=["baseline"], out_dir=str(tmp_path)))
    assert set(report["feature_sets"]) == {"baseline"} and report["features"]["deviation"] == 0
    assert "note" in report["merchant_risk"] and not (tmp_path / "merchant_risk.parquet").exists()
