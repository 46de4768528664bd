"""Checkpoints: state_dict + resolved config + data sizes + tokenizer reference + metrics (never a pickled
module), loadable with `torch.load(weights_only=True)`. `load_model` is the one loader used by resume,
evaluate, embed and serve; the file names are `RunDir`'s (run.py):

    RUN_DIR/models/NAME/checkpoint.pt   the best model (by validation NDCG@10)    which="best"
    RUN_DIR/models/NAME/last.pt         the latest epoch + optimizer state, for --resume   which="last"

A checkpoint records the SHA-256 of the run's tokenizer.json: loaded into a run whose tokenizer differs
(a model directory copied from another run, or a run prepared again) it is refused with one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch

from pantherseq.config import build_config
from pantherseq.errors import ConfigError, echo
from pantherseq.model.base import DataInfo, ModelConfig, SequenceModel
from pantherseq.run import RunDir

FORMAT_VERSION = 1
KINDS = ("best", "last")
REQUIRED_KEYS = ("model_name", "state_dict", "model_config", "data_info")


def model_dir(run_dir: RunDir | str | Path, name: str) -> Path:
    return RunDir.of(run_dir).model_dir(name)


def checkpoint_path(run_dir: RunDir | str | Path, name: str, which: str = "best") -> Path:
    """`which` = best | last (their file names checkpoint.pt | last.pt are accepted too)."""
    run = RunDir.of(run_dir)
    by_file = {run.checkpoint(name, kind).name: kind for kind in KINDS}
    kind = by_file.get(which, which)
    if kind not in KINDS:
        raise ConfigError(f"checkpoint {echo(which)} is not one of {', '.join(KINDS)}")
    return run.checkpoint(name, kind)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(path: Path, model: SequenceModel, name: str, model_cfg: ModelConfig, info: DataInfo,
                    run_dir: RunDir | str | Path, train_cfg: Any = None, metrics: dict | None = None,
                    extra: dict | None = None) -> None:
    run = RunDir.of(run_dir)
    tok = run.tokenizer_file
    state = {
        "format_version": FORMAT_VERSION,
        "model_name": name,
        "state_dict": model.state_dict(),
        "model_config": dataclasses.asdict(model_cfg),
        "train_config": dataclasses.asdict(train_cfg) if train_cfg is not None else {},
        "data_info": dataclasses.asdict(info),
        "tokenizer": {"path": f"../../{tok.name}", "sha256": file_sha256(tok) if tok.is_file() else None},
        "metrics": metrics or {},
        **(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint


def _unreadable(path: Path, why: str) -> ConfigError:
    return ConfigError(f"checkpoint {path} cannot be read ({why[:120]}): it is empty, truncated or not a "
                       "pantherseq checkpoint; train it again with `pantherseq pretrain`")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict; one ConfigError line naming the file when it is missing, empty or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}: run `pantherseq pretrain` first")
    if path.stat().st_size == 0:
        raise _unreadable(path, "0 bytes")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (torch raises RuntimeError, EOFError, UnpicklingError, ...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _unreadable(path, f"{type(exc).__name__}: {first}") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise _unreadable(path, "not a checkpoint dict")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"checkpoint {path} has format {ckpt.get('format_version')!r}, this version reads "
                          f"{FORMAT_VERSION}: train it again with `pantherseq pretrain`")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> SequenceModel:
    from pantherseq.model.registry import build_model

    cfg = build_config(ModelConfig, ckpt["model_config"], "checkpoint.model_config")
    info = DataInfo(**ckpt["data_info"])
    model = build_model(ckpt["model_name"], cfg, info)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise ConfigError(f"checkpoint {path}: its weights do not fit model {ckpt['model_name']!r} "
                          f"({str(exc).splitlines()[0][:200]})") from None
    model.eval()
    return model


def check_same_run(ckpt: dict[str, Any], run_dir: RunDir | str | Path, path: str | Path) -> None:
    """One ConfigError line when the checkpoint was trained on a run with another tokenizer."""
    tok = RunDir.of(run_dir).tokenizer_file
    expected = (ckpt.get("tokenizer") or {}).get("sha256")
    if expected and tok.is_file() and file_sha256(tok) != expected:
        raise ConfigError(f"checkpoint {path} belongs to another run: it was trained with a tokenizer other "
                          f"than {tok} (copied from another run, or this run was prepared again); train it "
                          "on this run with `pantherseq pretrain`")


def load_model(run_dir: RunDir | str | Path, name: str, which: str = "best"
               ) -> tuple[SequenceModel, dict[str, Any]]:
    """The model trained on `run_dir` under `name`, in eval mode, with its checkpoint dict.

    which: best | last (or the file names checkpoint.pt | last.pt)."""
    path = checkpoint_path(run_dir, name, which)
    ckpt = load_checkpoint(path)
    check_same_run(ckpt, run_dir, path)
    return model_from_checkpoint(ckpt, path), ckpt
