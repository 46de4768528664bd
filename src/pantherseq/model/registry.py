"""MODELS: every next-behaviour model by name, and `build_model` (SPEC §4: one registry for PANTHER
and its baselines, so they share the data path, trainer and evaluation)."""

from __future__ import annotations

from pantherseq.model.base import DataInfo, ModelConfig, SequenceModel
from pantherseq.model.hstu import HSTU
from pantherseq.model.panther import Panther, Transformer
from pantherseq.model.sasrec import SASRec

MODELS: dict[str, type[SequenceModel]] = {
    # neural models (NeuralModel subclasses, trained by gradient steps)
    "panther": Panther,
    "transformer": Transformer,
    "sasrec": SASRec,
    "hstu": HSTU,
    # count models (CountModel subclasses from model/counts.py): "markov", "popular"
}


def build_model(name: str, cfg: ModelConfig, info: DataInfo) -> SequenceModel:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    return MODELS[name](cfg, info)
