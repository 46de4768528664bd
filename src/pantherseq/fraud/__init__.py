"""Fraud detection with pretrained behaviour (SPEC §7): deviation features, user state, the hybrid risk
model and merchant risk. `run_fraud` is the `pantherseq fraud` stage."""

from pantherseq.fraud.behaviour import BehaviourFeatures, behaviour_features, scoring_windows
from pantherseq.fraud.dcn import DCNConfig, fit_dcn
from pantherseq.fraud.features import baseline_features
from pantherseq.fraud.hybrid import FEATURE_SETS, LGBMConfig, RiskModel, fit_risk_model
from pantherseq.fraud.merchant import merchant_auc, merchant_risk
from pantherseq.fraud.metrics import fraud_metrics
from pantherseq.fraud.pipeline import FraudConfig, build_features, load_fraud_config, run_fraud

__all__ = [
    "FEATURE_SETS",
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
    "merchant_auc",
    "merchant_risk",
    "run_fraud",
    "scoring_windows",
]
