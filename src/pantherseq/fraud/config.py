"""`pantherseq fraud`'s configuration and its time periods (docs/FRAUD.md).

    FraudConfig                      the keys of a fraud TOML file (`[lgbm]`, `[dcn]` tables)
    load_fraud_config(file, overrides)
    resolve_periods(cfg, split, first, last) -> Periods      the risk model's training and test periods
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pantherseq.config import apply_overrides, build_config, load_toml
from pantherseq.errors import ConfigError
from pantherseq.fraud.dcn import DCNConfig
from pantherseq.fraud.features import ROBUST_DAYS, WINDOWS
from pantherseq.fraud.hybrid import FEATURE_SETS, LGBMConfig

log = logging.getLogger(__name__)
MERCHANT_FIELDS = ("terminal_id", "merchant_id", "merchant", "merchant_name")


@dataclass
class FraudConfig:
    """`pantherseq fraud --config FILE`: these keys at the top level of the TOML file, `[lgbm]` a table."""

    train_start: str | None = None  # None = the run's split.t1
    train_end: str | None = None  # None = train_start + train_share of the remaining time
    test_start: str | None = None  # None = train_end + gap_days
    test_end: str | None = None  # None = after the last event
    gap_days: int = 7
    train_share: float = 0.4
    amount_field: str = "amount"
    merchant_field: str | None = None  # None = the first of MERCHANT_FIELDS the data has
    categorical: list[str] | None = None  # context fields; None = string fields with <= 50 values
    windows: list[int] = field(default_factory=lambda: list(WINDOWS))
    delay_days: int = 7
    robust_days: int = ROBUST_DAYS  # the customer's past the robust amount deviation (rz_*) reads
    context: int = 100  # events of history every prediction sees at least (when the user has them)
    # PCA components kept of the pooled and of the recent state: 0 = dropped (the embedding ablation:
    # baseline+embedding is then the baseline and hybrid baseline+deviation), -1 = all D dimensions
    embedding_dims: int = 16
    feature_sets: list[str] = field(default_factory=lambda: list(FEATURE_SETS))
    card_k: int = 100
    merchant_quantile: float = 0.9
    merchant_min_users: int = 3
    # auto = −log P_u(m) (paper §4.1.3): surprisal_<merchant> if the merchant is a token field, else the merchant
    # field head's head_surprisal_<merchant>, else the token surprisal
    merchant_delta: str = "auto"
    compromised_scenario: int | None = None  # None = handbook 2 (compromised terminals), simulated 6 (rogue)
    allow_in_sample: bool = False
    threads: int | None = None  # torch threads for the behaviour pass
    batch_windows: int = 64
    pos_chunk: int = 128  # positions per V-way softmax: small enough to stay in cache
    save_features: bool = False
    out_dir: str | None = None  # None = RUN_DIR/fraud (give another to keep several models' results)
    risk_model: Literal["lightgbm", "dcn"] = "lightgbm"  # a name of fraud/risk.py RISK_MODELS
    lgbm: LGBMConfig = field(default_factory=LGBMConfig)
    dcn: DCNConfig = field(default_factory=DCNConfig)

    def validate(self, where: str) -> None:
        bad = [s for s in self.feature_sets if s not in FEATURE_SETS]
        if bad or not self.feature_sets:
            raise ConfigError(f"{where}.feature_sets: {bad or 'none'} invalid; valid: {', '.join(FEATURE_SETS)}")
        if self.robust_days < 1:
            raise ConfigError(f"{where}.robust_days must be >= 1, got {self.robust_days}")
        if not 0.0 < self.train_share < 1.0:
            raise ConfigError(f"{where}.train_share must be in (0, 1)")
        if not 0.0 <= self.merchant_quantile <= 1.0:
            raise ConfigError(f"{where}.merchant_quantile must be in [0, 1]")
        for name in PERIOD_KEYS:
            value = getattr(self, name)
            if value is not None:
                try:
                    datetime.fromisoformat(value)
                except ValueError:
                    raise ConfigError(f"{where}.{name} {value!r} is not an ISO date") from None


PERIOD_KEYS = ("train_start", "train_end", "test_start", "test_end")


def load_fraud_config(file: str | Path | None = None, overrides: list[str] | None = None) -> FraudConfig:
    """A TOML file (keys of FraudConfig at the top level) and `key=value` overrides. Period bounds may be
    TOML dates (`test_start = 2018-08-08`) or strings."""
    raw = apply_overrides(load_toml(file) if file else {}, overrides)
    for key in PERIOD_KEYS:
        if isinstance(raw.get(key), (date, datetime)):
            raw[key] = raw[key].isoformat()
    return build_config(FraudConfig, raw, str(file) if file else "fraud config")


@dataclass
class Periods:
    train: tuple[datetime, datetime]
    test: tuple[datetime, datetime]

    def as_dict(self) -> dict[str, list[str]]:
        return {"train": [str(d) for d in self.train], "test": [str(d) for d in self.test]}


def resolve_periods(cfg: FraudConfig, split: Any, first: datetime, last: datetime) -> Periods:
    """Fill the missing period bounds (see FraudConfig) and check the protocol."""
    t1 = datetime.fromisoformat(split.t1) if split.kind == "time" and split.t1 else None
    day = timedelta(days=1)
    start = _date(cfg.train_start) or t1
    if start is None:
        raise ConfigError("a leave_last_out run has no time split: give train_start .. test_end")
    end = _date(cfg.test_end) or (last + timedelta(microseconds=1))
    train_end = _date(cfg.train_end) or start + ((end - start) * cfg.train_share) // day * day
    test_start = _date(cfg.test_start) or train_end + cfg.gap_days * day
    p = Periods((start, train_end), (test_start, end))
    if not (start < train_end <= test_start < end):
        raise ConfigError(f"periods out of order: train {p.train}, test {p.test}")
    if t1 is not None and start < t1 and not cfg.allow_in_sample:
        raise ConfigError(f"the risk model's training period starts {start} but the generative model "
                          f"trained on events before {t1}: its deviation features would be in-sample "
                          "(set allow_in_sample = true to do it anyway)")
    t2 = datetime.fromisoformat(split.t2) if split.kind == "time" and split.t2 else None
    if t2 is not None and start < t2:
        log.warning("the risk model trains from %s, inside the generative model's validation period "
                    "(before %s): early stopping saw those events", start, t2)
    return p


def _date(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None
