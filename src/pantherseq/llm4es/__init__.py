"""LLM4ES (Shestov et al.): user embeddings from a language model fine-tuned on event sequences as text."""

from pantherseq.llm4es.model import FinetuneConfig, LoadedLM, embed_encoded, encode_texts, finetune, load_lm
from pantherseq.llm4es.pipeline import LLM4ESConfig, embed_users, load_llm4es_config, run_llm4es
from pantherseq.llm4es.pretrained import PACKAGED_MODELS, find_packaged_model
from pantherseq.llm4es.text import (
    TEXT_FORMATS,
    TextConfig,
    load_descriptions,
    serialise_frame,
    serialise_users,
)

__all__ = [
    "PACKAGED_MODELS", "TEXT_FORMATS", "FinetuneConfig", "LLM4ESConfig", "LoadedLM", "TextConfig",
    "embed_encoded", "embed_users", "encode_texts", "find_packaged_model", "finetune", "load_descriptions",
    "load_llm4es_config", "load_lm", "run_llm4es", "serialise_frame", "serialise_users",
]
