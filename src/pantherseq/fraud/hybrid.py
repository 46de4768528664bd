"""The hybrid risk model g (SPEC §7, paper §3.1 Stage 2): gradient-boosted trees on
[context ψ, recent pattern, pooled history state, Δ], and the feature sets it is compared on.

    FEATURE_SETS        baseline | baseline+robust_z | baseline+embedding | baseline+deviation |
                        baseline+robust_z+deviation | hybrid
    LGBMConfig          the booster's knobs (defaults below)
    early_stopping_split(t, y, customer, ...)      fit rows, early-stopping rows: later, no shared customer
    fit_risk_model(X, y, t, cfg, cats, customer) -> RiskModel   early stopping, then a refit on all rows
    RiskModel.predict(X) -> (N,) scores; .save(stem); RiskModel.load(stem); .importances()
    (registered as `lightgbm` in fraud/risk.py's RISK_MODELS)

Decisions (the paper uses a DCN; the downstream model is free):
- LightGBM, one thread (MEASURED.md: 2 threads ran 10-20x slower on these machines), binary log-loss.
- Class imbalance: positives weighted by sqrt(negatives / positives) unless `pos_weight` is given;
  the full ratio over-weights a 0.1-1% class and hurts the precision at the top the metrics reward.
- Early stopping on the binary log-loss (`stopping_metric`; its average precision is recorded beside it) over
  the *last* `valid_share` of the training period by time (never
  a random slice: that would let the trees learn from days after the ones they are validated on) of a
  held-out half of the customers, none of whom is in the fit slice (`early_stopping_split`: trees that fit
  individual customers are not rewarded), then the model is refit on the whole training period for the
  best number of rounds (`refit`). Log-loss, not AP: that slice holds the frauds of a few dozen customers
  (a takeover is a run of one customer's events), so its AP moves in steps and peaked at round 8 of 800 on
  the simulator's baseline (AP 0.83 on the test period, against 0.93 at the rounds log-loss picks): a
  proper scoring rule over every row is the smoother stopping signal.
- NaN is LightGBM's missing value: the Δ of UNK events and of a user's first event are missing.
LightGBM is imported inside the functions (it is the `fraud` extra).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from pantherseq.errors import ConfigError

log = logging.getLogger(__name__)

FEATURE_SETS = ("baseline", "baseline+robust_z", "baseline+embedding", "baseline+deviation", "baseline+robust_z+deviation",
                "hybrid")
GROUPS = {  # feature groups each set uses
    "baseline": ("baseline",),
    "baseline+robust_z": ("baseline", "robust"),
    "baseline+embedding": ("baseline", "embedding"),
    "baseline+deviation": ("baseline", "deviation"),
    # does Δ add anything on top of the strongest hand-made set (the handbook's question: docs/FRAUD.md)
    "baseline+robust_z+deviation": ("baseline", "robust", "deviation"),
    "hybrid": ("baseline", "embedding", "deviation"),  # the hand-made robust_z is the bar it must clear
}


@dataclass
class LGBMConfig:
    learning_rate: float = 0.05
    num_leaves: int = 31
    min_child_samples: int = 100
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8
    bagging_freq: int = 1
    lambda_l2: float = 1.0
    max_rounds: int = 2000
    early_stopping: int = 100
    stopping_metric: str = "binary_logloss"  # or "average_precision" (module doc)
    valid_share: float = 0.2  # the last share of the training rows (by time) used for early stopping
    valid_customers: float = 0.5  # the share of customers held out of the fit slice (early_stopping_split)
    pos_weight: float | None = None  # None = sqrt(negatives / positives)
    refit: bool = True
    threads: int = 1
    seed: int = 0

    def validate(self, where: str) -> None:
        check_split(self, where)
        if self.stopping_metric not in STOPPING_METRICS:
            raise ConfigError(f"{where}.stopping_metric {self.stopping_metric!r} is not one of "
                              f"{', '.join(STOPPING_METRICS)}")


STOPPING_METRICS = ("binary_logloss", "average_precision")


def check_split(cfg, where: str) -> None:
    for name in ("valid_share", "valid_customers"):
        if not 0.0 < getattr(cfg, name) < 1.0:
            raise ConfigError(f"{where}.{name} must be in (0, 1), got {getattr(cfg, name)}")


def early_stopping_split(t: np.ndarray, y: np.ndarray, customer: np.ndarray | None, valid_share: float,
                         valid_customers: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, early-stopping rows), both sorted. The early-stopping slice is the last `valid_share` of
    the rows by time, restricted to a held-out `valid_customers` share of the customers; the fit slice is
    the earlier rows of the other customers. So the slice is later than every fit row (the trees never
    learn from days after those they are validated on) and shares no customer with it (a model that fits
    individual customers is not rewarded). The held-out customers are drawn by `seed` separately among those
    with a fraud in the late rows and the others, so both slices keep frauds. customer None: time only."""
    n = len(t)
    order = np.argsort(np.asarray(t), kind="stable")
    late = np.zeros(n, bool)
    late[order[int(n * (1.0 - valid_share)):]] = True
    if customer is None:
        return np.flatnonzero(~late), np.flatnonzero(late)
    ids, cust = np.unique(np.asarray(customer), return_inverse=True)
    hit = np.zeros(len(ids), bool)
    hit[cust[late & (np.asarray(y) == 1)]] = True
    rng = np.random.default_rng(seed)
    held = np.zeros(len(ids), bool)
    for stratum in (np.flatnonzero(hit), np.flatnonzero(~hit)):
        k = int(np.ceil(valid_customers * len(stratum)))  # at least one late fraud customer when any
        held[rng.permutation(stratum)[:k]] = True
    out = held[cust]
    return np.flatnonzero(~late & ~out), np.flatnonzero(late & out)


def risk_split(t: np.ndarray, y: np.ndarray, customer: np.ndarray | None, cfg: LGBMConfig
               ) -> tuple[np.ndarray, np.ndarray, bool]:
    """`early_stopping_split` with cfg's shares; when too few fraud customers leave one slice without fraud,
    the time-only split (logged; the third value says which). ConfigError when even that has none."""
    fit, valid = early_stopping_split(t, y, customer, cfg.valid_share, cfg.valid_customers, cfg.seed)
    disjoint = customer is not None
    if disjoint and (y[valid].sum() == 0 or y[fit].sum() == 0):
        log.warning("too few fraud customers for a customer-disjoint early-stopping slice (%d frauds in the fit "
                    "slice, %d in the early-stopping one): split by time only", y[fit].sum(), y[valid].sum())
        (fit, valid), disjoint = early_stopping_split(t, y, None, cfg.valid_share, cfg.valid_customers), False
    if y[valid].sum() == 0 or y[fit].sum() == 0:
        raise ConfigError("no fraud in one of the fit / early-stopping slices: lengthen the risk model's "
                          "training period or change valid_share")
    return fit, valid, disjoint


def _lightgbm():
    try:
        import lightgbm
    except ImportError:
        raise ConfigError("the fraud stage needs LightGBM: pip install 'pantherseq[fraud]'") from None
    return lightgbm


def _params(cfg: LGBMConfig) -> dict:
    return {
        "objective": "binary", "learning_rate": cfg.learning_rate,
        # the first metric stops the training (first_metric_only), the other is recorded
        "metric": [cfg.stopping_metric, *(m for m in STOPPING_METRICS if m != cfg.stopping_metric)],
        "num_leaves": cfg.num_leaves, "min_child_samples": cfg.min_child_samples,
        "feature_fraction": cfg.feature_fraction, "bagging_fraction": cfg.bagging_fraction,
        "bagging_freq": cfg.bagging_freq, "lambda_l2": cfg.lambda_l2,
        "num_threads": cfg.threads, "seed": cfg.seed, "deterministic": True, "verbosity": -1,
        "force_row_wise": True,
    }


class RiskModel:
    """A trained booster and the feature names it expects (columns are taken by name)."""

    kind = "lightgbm"

    def __init__(self, booster, features: list[str], info: dict):
        self.booster, self.features, self.info = booster, features, info

    def predict(self, X: pl.DataFrame) -> np.ndarray:
        return self.predict_matrix(_matrix(X, self.features))

    def predict_matrix(self, M: np.ndarray) -> np.ndarray:
        """(N, F) float32 in `features` order -> (N,) scores (the service's one-row path)."""
        return self.booster.predict(np.asarray(M, dtype=np.float32), num_threads=self.info.get("threads", 1))

    def importances(self) -> pl.DataFrame:
        return pl.DataFrame({
            "feature": self.features,
            "gain": self.booster.feature_importance("gain").astype(np.float64),
            "split": self.booster.feature_importance("split").astype(np.int64),
        }).sort("gain", descending=True)

    def save(self, stem: str | Path) -> None:
        """stem.txt (the booster) + stem.json (kind, features, training info)."""
        stem = Path(stem)
        self.booster.save_model(str(stem.with_suffix(".txt")))
        stem.with_suffix(".json").write_text(json.dumps({"kind": self.kind, "features": self.features,
                                                         **self.info}, indent=1))

    @classmethod
    def load(cls, stem: str | Path) -> RiskModel:
        stem = Path(stem)
        meta = json.loads(stem.with_suffix(".json").read_text())
        booster = _lightgbm().Booster(model_file=str(stem.with_suffix(".txt")))
        return cls(booster, meta.pop("features"), {k: v for k, v in meta.items() if k != "kind"})


def _matrix(X: pl.DataFrame, features: list[str]) -> np.ndarray:
    return X.select(features).cast(pl.Float32).to_numpy().astype(np.float32)


def fit_risk_model(X: pl.DataFrame, y: np.ndarray, t: np.ndarray, cfg: LGBMConfig,
                   categorical: list[str] | None = None, customer: np.ndarray | None = None) -> RiskModel:
    """Train on rows X (features by name), labels y (0/1), times t (any sortable) and the rows' customers
    (for the early-stopping split: `early_stopping_split`)."""
    lgb = _lightgbm()
    y = np.asarray(y).astype(np.int8)
    pos, neg = int(y.sum()), int((y == 0).sum())
    if pos == 0 or neg == 0:
        raise ConfigError(f"the risk model's training period has {pos} frauds and {neg} genuine events: "
                          "it needs both")
    features = list(X.columns)
    cats = [c for c in (categorical or []) if c in features]
    weight = cfg.pos_weight if cfg.pos_weight is not None else float(np.sqrt(neg / pos))
    params = _params(cfg)
    # the positives' weight as row weights, on the early-stopping slice too: its log-loss is then the
    # training objective on held-out rows (with `scale_pos_weight` the unweighted validation log-loss rose
    # from the first round on the handbook and stopped every model at round 1)
    w = np.where(y == 1, weight, 1.0)
    M = _matrix(X, features)
    fit_rows, valid_rows, disjoint = risk_split(t, y, customer, cfg)
    train_set = lgb.Dataset(M[fit_rows], y[fit_rows], weight=w[fit_rows], feature_name=features, categorical_feature=cats,
                            free_raw_data=False)
    valid_set = lgb.Dataset(M[valid_rows], y[valid_rows], weight=w[valid_rows], reference=train_set)
    booster = lgb.train(params, train_set, num_boost_round=cfg.max_rounds, valid_sets=[valid_set],
                        callbacks=[lgb.early_stopping(cfg.early_stopping, first_metric_only=True, verbose=False)])
    best = max(int(booster.best_iteration or cfg.max_rounds), 1)
    valid_ap = float(booster.best_score["valid_0"]["average_precision"])
    valid_loss = float(booster.best_score["valid_0"]["binary_logloss"])
    if cfg.refit:
        full = lgb.Dataset(M, y, weight=w, feature_name=features, categorical_feature=cats)
        booster = lgb.train(params, full, num_boost_round=best)
    info = {"best_iteration": best, "stopping_metric": cfg.stopping_metric, "valid_average_precision": valid_ap,
            "valid_logloss": valid_loss, "pos_weight": weight,
            "train_rows": len(y), "train_frauds": pos, "fit_rows": len(fit_rows), "valid_rows": len(valid_rows),
            "valid_frauds": int(y[valid_rows].sum()), "customer_disjoint": disjoint,
            "refit": cfg.refit, "threads": cfg.threads}
    log.info("risk model: %d features, %d rounds, early-stopping log-loss %.5f, AP %.4f", len(features), best,
             valid_loss, valid_ap)
    return RiskModel(booster, features, info)
