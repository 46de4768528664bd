"""Checkpoints: state_dict + resolved config + data sizes + tokenizer reference + metrics (never a pickled
module), loadable with `torch.load(weights_only=True)`. `load_model` is the one loader used by resume,
evaluate, embed and serve.

    RUN_DIR/models/NAME/checkpoint.pt   the best model (by validation NDCG@10)
    RUN_DIR/models/NAME/last.pt         the latest epoch + optimizer state, for --resume
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch

from pantherseq.config import build_config
from pantherseq.errors import ConfigError
from pantherseq.model.base import DataInfo, ModelConfig, SequenceModel

FORMAT_VERSION = 1


def model_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / "models" / name


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(path: Path, model: SequenceModel, name: str, model_cfg: ModelConfig, info: DataInfo,
                    run_dir: Path, train_cfg: Any = None, metrics: dict | None = None,
                    extra: dict | None = None) -> None:
    tok = Path(run_dir) / "tokenizer.json"
    state = {
        "format_version": FORMAT_VERSION,
        "model_name": name,
        "state_dict": model.state_dict(),
        "model_config": dataclasses.asdict(model_cfg),
        "train_config": dataclasses.asdict(train_cfg) if train_cfg is not None else {},
        "data_info": dataclasses.asdict(info),
        "tokenizer": {"path": "../../tokenizer.json", "sha256": file_sha256(tok) if tok.is_file() else None},
        "metrics": metrics or {},
        **(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}: run `pantherseq pretrain` first")
    return torch.load(path, map_location="cpu", weights_only=True)


def model_from_checkpoint(ckpt: dict[str, Any]) -> SequenceModel:
    from pantherseq.model.registry import build_model

    cfg = build_config(ModelConfig, ckpt["model_config"], "checkpoint.model_config")
    info = DataInfo(**ckpt["data_info"])
    model = build_model(ckpt["model_name"], cfg, info)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model


def load_model(run_dir: str | Path, name: str, which: str = "checkpoint.pt"
               ) -> tuple[SequenceModel, dict[str, Any]]:
    """The model trained on `run_dir` under `name`, in eval mode, with its checkpoint dict."""
    ckpt = load_checkpoint(model_dir(run_dir, name) / which)
    tok = Path(run_dir) / "tokenizer.json"
    expected = ckpt.get("tokenizer", {}).get("sha256")
    if expected and tok.is_file() and file_sha256(tok) != expected:
        raise ConfigError(f"{tok} changed since model {name!r} was trained: re-run pretrain")
    return model_from_checkpoint(ckpt), ckpt
