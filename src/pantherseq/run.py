"""The run directory: the one place that names a run's files, checks that a run is prepared, and loads it.

    run = RunDir("runs/hb").require()     # ConfigError (one line) unless `pantherseq prepare` wrote it
    run.config()                          # the resolved DatasetConfig (config.toml)
    run.tokenizer()                       # StructuredTokenizer (tokenizer.json)
    run.model_dir("panther")              # RUN_DIR/models/panther/ (checkpoint.pt, last.pt, ...)
    run.fraud_dir()                       # RUN_DIR/fraud/ as a FraudDir

Layout (docs/DATA.md, docs/MODELS.md, docs/FRAUD.md):

    prepare.json  config.toml  tokenizer.json  sequences/  events.parquet  users.parquet  [profile.parquet]
    [items.parquet]
    models/NAME/  checkpoint.pt  last.pt  train_log.jsonl  metrics.json  pretrain.toml
    eval.json     fraud/ (FraudDir)  prototypes.json  serve_demo.json  report.html  report.md  report/
    probe.json    states.db          llm4es/ (EmbeddingsDir)   predictions.parquet

Every stage takes a `RunDir` (or a path, turned into one by `RunDir.of`); no other module spells these
names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pantherseq.errors import ConfigError

if TYPE_CHECKING:
    import polars as pl

    from pantherseq.data.schema import DatasetConfig
    from pantherseq.tokenizer import StructuredTokenizer


@dataclass(frozen=True)
class FraudDir:
    """What `pantherseq fraud` writes (RUN_DIR/fraud/ or its `out_dir`)."""

    path: Path

    @property
    def report(self) -> Path:
        return self.path / "fraud.json"

    @property
    def scores(self) -> Path:
        return self.path / "scores.parquet"

    @property
    def merchant_risk(self) -> Path:
        return self.path / "merchant_risk.parquet"

    @property
    def importances(self) -> Path:
        return self.path / "importances.parquet"

    @property
    def features(self) -> Path:
        return self.path / "features.parquet"

    @property
    def embedding_pca(self) -> Path:
        return self.path / "embedding_pca.npz"

    def risk_model(self, feature_set: str) -> Path:
        """The saved risk model of a feature set (its files share this stem; see fraud/risk.py)."""
        return self.path / f"risk_model_{feature_set.replace('+', '_')}"

    def exists(self) -> bool:
        return self.report.is_file()

    def read_report(self) -> dict[str, Any] | None:
        return read_json(self.report)


@dataclass(frozen=True)
class EmbeddingsDir:
    """Per-user embeddings a stage wrote into RUN_DIR/NAME/ (`pantherseq llm4es` -> RUN_DIR/llm4es/, CoLES):
    what `pantherseq probe` reads as representation NAME."""

    path: Path

    @property
    def embeddings(self) -> Path:
        """float32 (U, D), row i = user_idx i."""
        return self.path / "embeddings.npy"

    @property
    def users(self) -> Path:
        return self.path / "users.parquet"

    @property
    def report(self) -> Path:
        """What the stage used and measured (llm4es: model, text format, fine-tuning, timings)."""
        return self.path / "config.json"

    @property
    def model(self) -> Path:
        """The fine-tuned model, when there is one."""
        return self.path / "model"


@dataclass(frozen=True)
class RunDir:
    """A run directory (see the module doc). Paths only; nothing is read until a loader is called."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    @classmethod
    def of(cls, run: RunDir | str | Path) -> RunDir:
        return run if isinstance(run, RunDir) else cls(run)

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    # -- files written by `prepare` ---------------------------------------------------------------
    @property
    def prepare_report(self) -> Path:
        return self.path / "prepare.json"

    @property
    def config_file(self) -> Path:
        return self.path / "config.toml"

    @property
    def tokenizer_file(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def sequences(self) -> Path:
        return self.path / "sequences"

    @property
    def events(self) -> Path:
        return self.path / "events.parquet"

    @property
    def users(self) -> Path:
        return self.path / "users.parquet"

    @property
    def profile(self) -> Path:
        return self.path / "profile.parquet"

    @property
    def items(self) -> Path:
        """The item side table the run joined (`[items]`), with the file's column names."""
        return self.path / "items.parquet"

    # -- files written by later stages ------------------------------------------------------------
    @property
    def models(self) -> Path:
        return self.path / "models"

    def model_dir(self, name: str) -> Path:
        return self.models / name

    def checkpoint(self, name: str, which: str = "best") -> Path:
        """`best` = checkpoint.pt (by validation NDCG@10), `last` = last.pt (for --resume)."""
        return self.model_dir(name) / {"best": "checkpoint.pt", "last": "last.pt"}[which]

    def train_log(self, name: str) -> Path:
        return self.model_dir(name) / "train_log.jsonl"

    def model_metrics(self, name: str) -> Path:
        return self.model_dir(name) / "metrics.json"

    def pretrain_config(self, name: str) -> Path:
        return self.model_dir(name) / "pretrain.toml"

    @property
    def eval_report(self) -> Path:
        return self.path / "eval.json"

    def fraud_dir(self, out: str | Path | None = None) -> FraudDir:
        return FraudDir(Path(out) if out else self.path / "fraud")

    @property
    def predictions(self) -> Path:
        """`pantherseq predict`'s default output."""
        return self.path / "predictions.parquet"

    @property
    def prototypes(self) -> Path:
        return self.path / "prototypes.json"

    @property
    def serve_demo(self) -> Path:
        return self.path / "serve_demo.json"

    @property
    def report_html(self) -> Path:
        return self.path / "report.html"

    @property
    def report_md(self) -> Path:
        return self.path / "report.md"

    @property
    def llm4es(self) -> Path:
        return self.path / "llm4es"

    @property
    def report_figures(self) -> Path:
        """The report's PNG files (report.md links them)."""
        return self.path / "report"

    @property
    def probe_report(self) -> Path:
        return self.path / "probe.json"

    @property
    def states(self) -> Path:
        """The default SQLite user-state store of `embed` / `serve` / `demo`."""
        return self.path / "states.db"

    def embeddings_dir(self, name: str) -> EmbeddingsDir:
        return EmbeddingsDir(self.path / name)

    # -- checks ------------------------------------------------------------------------------------
    def is_prepared(self) -> bool:
        return self.prepare_report.is_file()

    def require(self) -> RunDir:
        """This run, or one ConfigError line if `pantherseq prepare` has not written it."""
        if not self.path.exists():
            raise ConfigError(f"run directory {self.path} does not exist: run `pantherseq prepare --out "
                              f"{self.path}` first")
        if not self.is_prepared():
            raise ConfigError(f"{self.path} is not a prepared run directory (no {self.prepare_report.name}): "
                              "run `pantherseq prepare` first")
        return self

    def trained_models(self) -> list[str]:
        """Names of the models with a best checkpoint, sorted."""
        return sorted(p.parent.name for p in self.models.glob("*/checkpoint.pt"))

    # -- loaders -----------------------------------------------------------------------------------
    def config(self) -> DatasetConfig:
        from pantherseq.config import build_config, load_toml
        from pantherseq.data.schema import DatasetConfig

        return build_config(DatasetConfig, load_toml(self.config_file), str(self.config_file))

    def raw_config(self) -> dict[str, Any]:
        """config.toml as a plain dict (for what the typed config does not keep, e.g. the source name)."""
        from pantherseq.config import load_toml

        return load_toml(self.config_file)

    def tokenizer(self) -> StructuredTokenizer:
        from pantherseq.tokenizer import StructuredTokenizer

        return StructuredTokenizer.load(self.tokenizer_file)

    def read_prepare_report(self) -> dict[str, Any] | None:
        return read_json(self.prepare_report)

    def read_eval(self) -> dict[str, Any] | None:
        return read_json(self.eval_report)

    def read_events(self, columns: list[str] | None = None) -> pl.DataFrame:
        import polars as pl

        return pl.read_parquet(self.events, columns=columns)

    def scan_events(self) -> pl.LazyFrame:
        import polars as pl

        return pl.scan_parquet(self.events)

    def event_columns(self) -> list[str]:
        import polars as pl

        return list(pl.read_parquet_schema(self.events))

    def read_users(self) -> pl.DataFrame:
        """users.parquet (user_id, user_idx, ...) sorted by user_idx."""
        import polars as pl

        return pl.read_parquet(self.users).sort("user_idx")

    def user_index(self) -> dict[str, int]:
        """user id (as text) -> user_idx, for the users the run was prepared with."""
        import polars as pl

        from pantherseq.data.schema import USER

        users = self.read_users()
        return dict(zip(users[USER].cast(pl.Utf8).to_list(), users["user_idx"].to_list()))

    def read_profile(self) -> pl.DataFrame | None:
        """profile.parquet sorted by user_idx, or None when the run has no profile."""
        import polars as pl

        return pl.read_parquet(self.profile).sort("user_idx") if self.profile.is_file() else None


def read_json(path: Path) -> Any:
    """A JSON file's contents, or None when it does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None


__all__ = ["EmbeddingsDir", "FraudDir", "RunDir", "read_json"]
