"""`pretrain --init-from RUN/models/NAME`: fine-tune from another model's checkpoint (issue 16; the paper's
Table 8 pretrain-then-fine-tune and Table 7 user transfer).

The architecture is the checkpoint's: its [model] table replaces the defaults, and a `model.*` key set (by
--config or --set) to another value than the checkpoint's is refused with one line, except the keys that
only shape the loss or regularisation (`TRAINING_KEYS`: dropout, loss, ...). The registry model is the
checkpoint's too; a count model cannot be fine-tuned.

Weights:
- same tokenizer (the run the checkpoint was trained on, or a copy: the tokenizer files' SHA-256 agree) and
  the same data sizes: the state_dict is loaded as it is;
- another vocabulary: rows are matched by their readable keys. The token embedding, the output bias and the
  output projection by the token label (`channel=online|amount=[10, 20)`, tokenizer.token_label: the
  readable field values, so a token means the same in both runs however the runs number it); the field
  embeddings and field heads by (field name, value label) (`encoders.label`). Matched rows are copied, the
  others keep the model's fresh initialisation. Every other tensor is copied when its shape agrees
  (the transformer blocks, positions, time gap, SPRM, copy head), except the profile's categorical
  embeddings, whose codes number each run's profile values by their frequency in that run: those start
  fresh across runs.

What was done is recorded as `init_from` in the model's metrics.json and checkpoint metrics (path, same
tokenizer or not, tokens matched / total, fresh tensors) and in pretrain.toml (`init_from = PATH`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from pantherseq.config import build_config
from pantherseq.data.schema import N_SPECIAL
from pantherseq.errors import ConfigError, echo
from pantherseq.model.base import ModelConfig, NeuralModel, SequenceModel
from pantherseq.model.registry import MODELS, check_model
from pantherseq.run import RunDir
from pantherseq.tokenizer import StructuredTokenizer
from pantherseq.train.checkpoint import file_sha256, load_checkpoint

log = logging.getLogger(__name__)
# [model] keys a fine-tuning run may change: they shape the loss and regularisation, not the weights
TRAINING_KEYS = ("dropout", "loss", "n_negatives", "auto_full_max_vocab", "contrastive_lambda", "contrastive_tau",
                 "contrastive_on", "contrastive_view_min", "field_loss_weight")
TOKEN_ROWS = ("token_emb.weight", "out_bias", "out_proj.weight")
FIELD_ROWS = ("embedding.field_embs.", "field_heads.heads.")  # + "<field index>.weight|bias"
RUN_SPECIFIC = ("profile.cat_embs.",)  # codes that number each run's profile values its own way


@dataclasses.dataclass
class InitSource:
    """A checkpoint to start from: its file, its dict and the tokenizer it was trained with."""

    path: Path
    ckpt: dict[str, Any]
    tokenizer_file: Path

    @property
    def model_name(self) -> str:
        return self.ckpt["model_name"]

    def model_config(self) -> ModelConfig:
        return build_config(ModelConfig, self.ckpt["model_config"], f"{self.path} model_config")


def load_init(path: str | Path) -> InitSource:
    """RUN/models/NAME (or its checkpoint.pt) -> InitSource; one ConfigError line when it is not usable."""
    path = Path(path)
    file = path / "checkpoint.pt" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"--init-from {path}: no checkpoint there (give RUN_DIR/models/NAME of a trained model)")
    ckpt = load_checkpoint(file)
    if not issubclass(MODELS[check_model(ckpt["model_name"])], NeuralModel):
        raise ConfigError(f"--init-from {path}: {ckpt['model_name']!r} is a count model; only a neural model "
                          "can be fine-tuned")
    ref = ckpt.get("tokenizer") or {}
    tok = (file.parent / ref.get("path", "../../tokenizer.json")).resolve()
    if not tok.is_file():
        raise ConfigError(f"--init-from {path}: its run's tokenizer {tok} is missing (the checkpoint must stay "
                          "in the run directory it was trained in)")
    if ref.get("sha256") and file_sha256(tok) != ref["sha256"]:
        raise ConfigError(f"--init-from {path}: {tok} is not the tokenizer the checkpoint was trained with "
                          "(that run was prepared again)")
    return InitSource(file, ckpt, tok)


def init_model_name(source: InitSource, requested: str | None) -> str:
    """The registry model to fine-tune: the checkpoint's (a different --model is refused)."""
    if requested is not None and requested != source.model_name:
        raise ConfigError(f"--model {requested} but --init-from {source.path.parent} holds a "
                          f"{source.model_name!r} model: drop --model or give the same one")
    return source.model_name


def init_model_table(source: InitSource, given: dict[str, Any]) -> dict[str, Any]:
    """The [model] table of a fine-tuning run: the checkpoint's, with the given TRAINING_KEYS over it; a
    given architecture key that differs from the checkpoint's is refused (one line)."""
    theirs = source.model_config()
    ours = build_config(ModelConfig, given, "model")
    for key in given:
        if key not in TRAINING_KEYS and getattr(ours, key) != getattr(theirs, key):
            raise ConfigError(f"model.{key} = {echo(getattr(ours, key))} conflicts with --init-from "
                              f"{source.path.parent}, whose model.{key} = {echo(getattr(theirs, key))}: the "
                              f"architecture comes from the checkpoint (only {', '.join(TRAINING_KEYS)} may "
                              "change)")
    return {**dataclasses.asdict(theirs), **{k: v for k, v in given.items() if k in TRAINING_KEYS}}


def check_architecture(cfg: ModelConfig, source: InitSource) -> None:
    """A config built without `init_model_table` must still have the checkpoint's architecture."""
    init_model_table(source, {k: v for k, v in dataclasses.asdict(cfg).items()})


def _match(keys_to: list[str], keys_from: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows in `to`, rows in `from`) of the keys both hold."""
    where = {k: i for i, k in enumerate(keys_from)}
    pairs = [(i, where[k]) for i, k in enumerate(keys_to) if k in where]
    rows = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return rows[:, 0], rows[:, 1]


def _field_keys(tok: StructuredTokenizer) -> list[list[str]]:
    """Per field, its codes' readable value labels (`encoders.label`; code 0 is the field's UNK)."""
    return [[enc.label(c) for c in range(enc.size)] for enc in tok.encoders]


def _field_tensor(name: str) -> tuple[str, int, str] | None:
    """"embedding.field_embs.2.weight" -> ("embedding.field_embs.", 2, ".weight"); None for other tensors."""
    for prefix in FIELD_ROWS:
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            return prefix, int(index), "." + rest
    return None


class _Sources:
    """For each tensor of the model being built: the checkpoint tensor it starts from and the row keys of
    both (None = copied whole), or nothing (fresh)."""

    def __init__(self, src_state: dict[str, torch.Tensor], tok_from: StructuredTokenizer,
                 tok_to: StructuredTokenizer):
        self.state, self.names_from, self.names_to = src_state, tok_from.field_names, tok_to.field_names
        self.labels = (tok_to.token_labels(), tok_from.token_labels())
        self.fields = (_field_keys(tok_to), _field_keys(tok_from))

    def __call__(self, name: str) -> tuple[torch.Tensor, tuple[list[str], list[str]] | None] | None:
        if name.startswith(RUN_SPECIFIC):
            return None
        if name in TOKEN_ROWS:
            src = self.state.get(name)
            return None if src is None else (src, self.labels)
        field = _field_tensor(name)
        if field is None:
            src = self.state.get(name)
            return None if src is None else (src, None)
        prefix, f, suffix = field
        if self.names_to[f] not in self.names_from:
            return None
        j = self.names_from.index(self.names_to[f])
        src = self.state.get(f"{prefix}{j}{suffix}")
        return None if src is None else (src, (self.fields[0][f], self.fields[1][j]))


def _copy(dst: torch.Tensor, src: torch.Tensor, keys: tuple[list[str], list[str]] | None) -> bool:
    """Copy `src` into `dst` (matched rows when `keys`); False when the shapes do not allow it."""
    if keys is None:
        if src.shape != dst.shape:
            return False
        dst.copy_(src)
        return True
    if src.shape[1:] != dst.shape[1:]:
        return False
    rows_to, rows_from = _match(*keys)
    dst[rows_to] = src[rows_from]
    return True


def warm_start(model: SequenceModel, source: InitSource, run: RunDir) -> dict[str, Any]:
    """Load the checkpoint's weights into `model` (built for `run`) as the module doc says; returns the
    `init_from` record."""
    check_architecture(model.cfg, source)
    src_state = source.ckpt["state_dict"]
    record: dict[str, Any] = {"path": str(source.path), "model": source.model_name}
    same = file_sha256(source.tokenizer_file) == file_sha256(run.tokenizer_file)
    n_tokens = model.info.vocab_size - N_SPECIAL
    sizes = {k: v for k, v in dataclasses.asdict(model.info).items() if k != "field_names"}
    if same and {k: v for k, v in source.ckpt["data_info"].items() if k != "field_names"} == sizes:
        model.load_state_dict(src_state)
        log.info("init from %s: the same tokenizer, every weight loaded", source.path)
        return record | {"same_tokenizer": True, "tokens_matched": n_tokens, "tokens_total": n_tokens, "fresh": []}
    sources = _Sources(src_state, StructuredTokenizer.load(source.tokenizer_file), run.tokenizer())
    fresh, state = [], model.state_dict()
    with torch.no_grad():
        for name, dst in state.items():
            found = sources(name)
            if found is None or not _copy(dst, *found):
                fresh.append(name)
    model.load_state_dict(state)
    labels_to, labels_from = sources.labels
    matched = len(set(labels_to[N_SPECIAL:]) & set(labels_from[N_SPECIAL:]))
    log.info("init from %s: %d of %d tokens matched by label; fresh: %s", source.path, matched, n_tokens,
             ", ".join(fresh) or "none")
    return record | {"same_tokenizer": same, "tokens_matched": matched, "tokens_total": n_tokens, "fresh": fresh}


__all__ = ["TRAINING_KEYS", "InitSource", "init_model_name", "init_model_table", "load_init", "warm_start"]
