"""MODELS: every next-behaviour model by name, and `build_model` (SPEC §4: one registry for PANTHER
and its baselines, so they share the data path, trainer and evaluation)."""

from __future__ import annotations

from pantherseq.errors import ConfigError
from pantherseq.model.base import DataInfo, ModelConfig, SequenceModel
from pantherseq.model.counts import Markov, Personal, Popular
from pantherseq.model.hstu import HSTU
from pantherseq.model.panther import Panther, Transformer
from pantherseq.model.sasrec import SASRec

MODELS: dict[str, type[SequenceModel]] = {
    # neural models (NeuralModel subclasses, trained by gradient steps)
    "panther": Panther,
    "transformer": Transformer,
    "sasrec": SASRec,
    "hstu": HSTU,
    # count models (CountModel subclasses, fitted by one counting pass over the same batches)
    "markov": Markov,
    "popular": Popular,
    "personal": Personal,
}


class UnknownModelError(ConfigError, ValueError):
    """A model name not in MODELS: a user-fixable config error (the CLI exits 2)."""


def check_model(name: str) -> str:
    """`name` if it is in MODELS, else UnknownModelError listing the valid names."""
    if name not in MODELS:
        raise UnknownModelError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    return name


def build_model(name: str, cfg: ModelConfig, info: DataInfo) -> SequenceModel:
    return MODELS[check_model(name)](cfg, info)
