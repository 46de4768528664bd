"""Fraud detection with pretrained behaviour (SPEC §7): deviation features, user state, the hybrid risk
model and merchant risk. `run_fraud` is the `pantherseq fraud` stage."""

from pantherseq.fraud.behaviour import BehaviourFeatures, behaviour_features, scoring_windows
from pantherseq.fraud.config import FraudConfig, load_fraud_config
from pantherseq.fraud.dcn import DCNConfig, fit_dcn
from pantherseq.fraud.features import baseline_features
from pantherseq.fraud.hybrid import FEATURE_SETS, LGBMConfig, RiskModel, fit_risk_model
from pantherseq.fraud.merchant import merchant_auc, merchant_risk
from pantherseq.fraud.metrics import fraud_metrics
from pantherseq.fraud.pipeline import build_features, run_fraud
from pantherseq.fraud.risk import RISK_MODELS, load_risk_model

__all__ = [
    "FEATURE_SETS",
    "RISK_MODELS",
    "BehaviourFeatures",
    "DCNConfig",
    "FraudConfig",
    "LGBMConfig",
    "RiskModel",
    "baseline_features",
    "behaviour_features",
    "build_features",
    "fit_dcn",
    "fit_risk_model",
    "fraud_metrics",
    "load_fraud_config",
    "load_risk_model",
    "merchant_auc",
    "merchant_risk",
    "run_fraud",
    "scoring_windows",
]
