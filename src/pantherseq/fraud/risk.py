"""The risk models g a `pantherseq fraud` run can train and `pantherseq serve` can load, by name.

    RISK_MODELS["lightgbm"]   gradient-boosted trees (fraud/hybrid.py; the default)
    RISK_MODELS["dcn"]        DCN-v2 in torch (fraud/dcn.py; the paper's g)

Every entry has `fit(X, y, t, cfg, categorical, customer) -> model` and `load(stem) -> model`; every model has
`features`, `info`, `predict(frame)`, `predict_matrix(M)` (the service's one-row path), `save(stem)` and
`importances()`. A saved model is `stem.json` (its `kind`, features and training info) beside the weights
(`stem.txt` or `stem.pt`), so `load_risk_model(stem)` needs no other hint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pantherseq.errors import ConfigError
from pantherseq.fraud.dcn import DCNRiskModel, fit_dcn
from pantherseq.fraud.hybrid import RiskModel, fit_risk_model


@dataclass(frozen=True)
class RiskModelKind:
    fit: Callable[..., Any]
    load: Callable[[Path], Any]
    config_key: str  # the FraudConfig table with its knobs


RISK_MODELS: dict[str, RiskModelKind] = {
    "lightgbm": RiskModelKind(fit_risk_model, RiskModel.load, "lgbm"),
    "dcn": RiskModelKind(fit_dcn, DCNRiskModel.load, "dcn"),
}


def risk_model_kind(name: str) -> RiskModelKind:
    if name not in RISK_MODELS:
        raise ConfigError(f"unknown risk model {name!r}; valid: {', '.join(RISK_MODELS)}")
    return RISK_MODELS[name]


def load_risk_model(stem: str | Path) -> Any:
    """The risk model saved at `stem` (see the module doc); ConfigError (one line) when absent or unreadable."""
    stem = Path(stem)
    meta_path = stem.with_suffix(".json")
    if not meta_path.is_file():
        raise ConfigError(f"no risk model at {meta_path}: run `pantherseq fraud` for this feature set")
    try:
        kind = json.loads(meta_path.read_text()).get("kind", "lightgbm")  # files before the registry: lightgbm
        return risk_model_kind(kind).load(stem)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 (a corrupt or truncated file: say which, never a traceback)
        raise ConfigError(f"{meta_path.parent}: risk model {stem.name} cannot be read "
                          f"({type(exc).__name__}): re-run `pantherseq fraud`") from None


__all__ = ["RISK_MODELS", "RiskModelKind", "load_risk_model", "risk_model_kind"]
