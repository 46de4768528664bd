"""The `llm4es` stage: a prepared run -> event texts -> (fine-tuned) language model -> user embeddings.

    run_llm4es(run_dir, model_dir, cfg, out=None) -> dict   (the contents of config.json)

Writes into `out` (default RUN_DIR/llm4es/), never touching the run's own files:
    embeddings.npy   float32 (U, D), row i = user_idx i; NaN rows for users with no event in `text.splits`
    users.parquet    user_id, user_idx, n_events (events written into the text)
    config.json      everything used: model dir and kind, text format, n_layers, fine-tuning, timings
    model/           the fine-tuned model + tokenizer (Hugging Face format, with llm4es.json), when fine-tuned
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pantherseq.config import load_config
from pantherseq.data.schema import USER
from pantherseq.errors import ConfigError
from pantherseq.llm4es.model import (
    Encoded,
    FinetuneConfig,
    LoadedLM,
    describe,
    embed_encoded,
    encode_texts,
    finetune,
    load_lm,
    save_lm,
    used_layers,
)
from pantherseq.llm4es.text import (
    USER_IDX,
    TextConfig,
    builtin_descriptions,
    serialise_users,
)
from pantherseq.run import EmbeddingsDir, RunDir

log = logging.getLogger(__name__)


@dataclass
class LLM4ESConfig:
    """`train` = false embeds with the model as it is (always so for encoder models)."""

    text: TextConfig = field(default_factory=TextConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    kind: str = "auto"
    n_layers: int = 4
    embed_batch_size: int = 8
    train: bool = True

    def validate(self, where: str) -> None:
        if self.n_layers < 1 or self.embed_batch_size < 1:
            raise ConfigError(f"{where}: n_layers and embed_batch_size must be >= 1")


def load_llm4es_config(file: str | None = None, overrides: list[str] | None = None) -> LLM4ESConfig:
    return load_config(LLM4ESConfig, file, overrides)


def encode_users(lm: LoadedLM, texts: pl.DataFrame, max_tokens: int = 512) -> Encoded:
    return encode_texts(lm.tokenizer, texts["header"].to_list(), texts["body"].to_list(), max_tokens)


def embed_users(lm: LoadedLM, texts: pl.DataFrame, n_users: int, n_layers: int = 4, max_tokens: int = 512,
                batch_size: int = 8, progress: bool = True, enc: Encoded | None = None) -> np.ndarray:
    """(n_users, D) float32 embeddings of `texts` (from `serialise_users`): row i = user_idx i, NaN for a
    user without a text. `enc`: the texts already tokenized (`encode_users`)."""
    enc = enc if enc is not None else encode_users(lm, texts, max_tokens)
    emb = embed_encoded(lm, enc, n_layers, batch_size, progress)
    out = np.full((n_users, emb.shape[1]), np.nan, np.float32)
    out[texts[USER_IDX].to_numpy()] = emb
    return out


def _users(run: RunDir, texts: pl.DataFrame) -> pl.DataFrame:
    users = pl.read_parquet(run.users, columns=[USER, USER_IDX])
    counts = texts.select(pl.col(USER_IDX).cast(users.schema[USER_IDX]), "n_events")
    return users.join(counts, on=USER_IDX, how="left").with_columns(pl.col("n_events").fill_null(0)
                                                                    ).sort(USER_IDX)


def run_llm4es(run_dir: RunDir | str | Path, model_dir: str | Path, cfg: LLM4ESConfig | None = None,
               out: str | Path | None = None, descriptions: dict[str, dict[str, str]] | None = None,
               progress: bool = True) -> dict[str, Any]:
    """LLM4ES on a prepared run (see the module docstring). `descriptions` (field -> code -> text) are
    merged over the dataset's built-in tables (`text.builtin_descriptions`)."""
    cfg = cfg or LLM4ESConfig()
    run = RunDir.of(run_dir).require()
    out = EmbeddingsDir(Path(out)) if out else run.embeddings_dir(run.llm4es.name)
    lm = load_lm(model_dir, cfg.kind)
    timings: dict[str, float] = {}

    descriptions = {**builtin_descriptions(run.config()), **(descriptions or {})}
    started = time.perf_counter()
    texts = serialise_users(run, cfg.text, descriptions)
    timings["serialise_s"] = round(time.perf_counter() - started, 3)
    users = _users(run, texts)
    log.info("serialised %d users (%s) in %.1f s", texts.height, cfg.text.format, timings["serialise_s"])

    started = time.perf_counter()
    enc = encode_users(lm, texts, cfg.finetune.max_tokens)
    timings["tokenize_s"] = round(time.perf_counter() - started, 3)
    result: dict[str, Any] = {"steps": 0, "seconds": 0.0}
    trained = cfg.train and lm.kind == "causal"
    if cfg.train and not trained:
        log.warning("%s is an encoder model: embedding without fine-tuning", lm.model_dir)
    if trained:
        result = finetune(lm, enc, cfg.finetune, progress)
    out.path.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    emb = embed_users(lm, texts, users.height, cfg.n_layers, cfg.finetune.max_tokens, cfg.embed_batch_size,
                      progress, enc)
    timings["embed_s"] = round(time.perf_counter() - started, 3)
    np.save(out.embeddings, emb)
    users.write_parquet(out.users)
    report = {
        "run": str(run), "model_dir": str(lm.model_dir), "out": str(out.path),
        "model": describe(lm), "format": cfg.text.format, "n_layers": cfg.n_layers,
        "n_layers_used": used_layers(lm, cfg.n_layers), "finetuned": trained,
        "steps": result["steps"], "seconds": round(result["seconds"] + sum(timings.values()), 2),
        "users": users.height, "users_without_text": int((users["n_events"] == 0).sum()),
        "embedding_dim": int(emb.shape[1]), "timings": timings, "finetune_result": result,
        "config": asdict(cfg),
        "descriptions": {k: len(v) for k, v in descriptions.items()},
        "versions": _versions(),
    }
    if trained:
        report["finetuned_model_dir"] = str(save_lm(lm, out.model, {k: report[k] for k in (
            "run", "format", "steps", "n_layers")}))
    out.report.write_text(json.dumps(report, indent=1, default=str))
    return report


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}
