"""Next-behaviour models: PANTHER and its baselines, selected by name from `MODELS`."""

from pantherseq.model.base import Batch, DataInfo, ModelConfig
from pantherseq.model.registry import MODELS, build_model

__all__ = ["MODELS", "Batch", "DataInfo", "ModelConfig", "build_model"]
