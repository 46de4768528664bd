"""pantherseq: generative pretraining on sequences of user behaviour (PANTHER, NeurIPS 2025; LLM4ES)."""

from pantherseq.data.schema import DatasetConfig, load_dataset_config
from pantherseq.prepare import prepare
from pantherseq.tokenizer import StructuredTokenizer

__all__ = ["DatasetConfig", "StructuredTokenizer", "load_dataset_config", "prepare"]
__version__ = "0.1.0"
