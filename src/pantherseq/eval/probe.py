"""User-level evaluation (SPEC §10): frozen user representations -> LightGBM, stratified k-fold CV.

The pytorch-lifestream protocol: each representation (a trained model's pooled embedding, hand-made
aggregates, an embeddings file such as LLM4ES's or CoLES's) is a fixed (U, D) matrix, row u = user_idx u;
a LightGBM classifier is trained on k-1 folds and scored on the held-out one; the report is mean ± std
over the folds (and over `repeats` reshuffles, each with its own seed). The folds depend on the labels
and the seed only, so every representation compared in one call is scored on the same folds.

    stratified_folds(y, k, seed)          fold id per user: each class spread evenly over the folds
    probe(X, y, task, folds, seed)        -> {mean, std, per_fold}: ROC-AUC (binary) / accuracy (multiclass)
    user_targets(run_dir, name)           -> (user_idx, y) for a name in TARGETS
    load_representation(run_dir, name)    -> (U, D) for a name in REPRESENTATIONS | a trained model | a file
    run_probe(run_dir, names, target)     everything above for several representations; RUN/probe.json

Decisions (the paper leaves them open):
- Targets: MovieLens-100k `gender` (F = 1) and `age` in buckets <25 / 25–34 / 35–44 / 45+; the
  simulator's hidden `persona` (6 classes; never an input of any model: the profile fields are age,
  gender, region, income) and `fraud_victim` (the user has any fraud-labelled event; the label itself is
  never an input, the fraudulent events are). The simulator's gender does not change behaviour at all,
  so probing it there is a noise control (≈ 0.5), not a task.
- `name+name` concatenates representations column-wise (e.g. `aggregates+panther`).
- A model that read the target as a profile input is refused (`check_no_profile_leak`): PANTHER adds e_u to every
  input, so its weights learn every user's label, test folds included. Replacing e_u by the population
  mean at embedding time does not undo it: on MovieLens-100k gender, the mean *token* embedding of a
  PANTHER trained with the profile scored ROC-AUC 0.785, of the profile-free transformer 0.583
  (benchmarks/profile_leak.py). Train the model with `model.profile_mode="none"` instead.
- LightGBM with fixed rounds and no early stopping, as pytorch-lifestream's embedding validation
  (`ProbeConfig`); one thread: with two it ran 10–20x slower on our 2-core machines (MEASURED.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from pantherseq.errors import ConfigError
from pantherseq.eval.representation import (
    RANDOM_DIM,
    aggregate_features,
    n_users,
    profile_inputs,
    user_embeddings,
)
from pantherseq.fraud.metrics import roc_auc
from pantherseq.run import RunDir, read_json

log = logging.getLogger(__name__)

TASKS = ("binary", "multiclass")
METRIC = {"binary": "roc_auc", "multiclass": "accuracy"}
AGE_BUCKETS = ("<25", "25-34", "35-44", "45+")
AGE_EDGES = (25, 35, 45)

__all__ = ["REPRESENTATIONS", "TARGETS", "ProbeConfig", "aggregate_features", "check_no_profile_leak", "format_probe_table",
           "load_representation", "probe", "run_probe", "stratified_folds", "user_embeddings", "user_targets"]


# --- folds and the probe --------------------------------------------------------------------------

def stratified_folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(N,) fold id in 0..k-1. Users are ordered by (class, random key) and dealt round-robin, so each
    class's count per fold differs by at most one, as do the fold sizes. Same (y, k, seed) -> same folds."""
    y = np.asarray(y)
    classes, counts = np.unique(y, return_counts=True)
    if k < 2:
        raise ConfigError(f"folds must be at least 2, got {k}")
    if counts.min() < k:
        raise ConfigError(f"class {classes[counts.argmin()]!r} has {counts.min()} users, fewer than {k} folds")
    order = np.lexsort((np.random.default_rng(seed).random(len(y)), y))
    fold = np.empty(len(y), dtype=np.int64)
    fold[order] = np.arange(len(y)) % k
    return fold


@dataclass
class ProbeConfig:
    """LightGBM settings of the probe (close to pytorch-lifestream's embedding-validation configs)."""

    rounds: int = 500
    learning_rate: float = 0.02
    num_leaves: int = 31
    min_child_samples: int = 30
    feature_fraction: float = 0.75
    bagging_fraction: float = 0.75
    lambda_l1: float = 1.0
    lambda_l2: float = 1.0
    threads: int = 1


def _fit_predict(X_tr: np.ndarray, y_tr: np.ndarray, X_te: np.ndarray, n_class: int, cfg: ProbeConfig,
                 seed: int) -> np.ndarray:
    """P(class 1) (binary) or (N, C) class probabilities of a booster trained on (X_tr, y_tr)."""
    import lightgbm

    params = {"learning_rate": cfg.learning_rate, "num_leaves": cfg.num_leaves,
              "min_child_samples": cfg.min_child_samples, "feature_fraction": cfg.feature_fraction,
              "bagging_fraction": cfg.bagging_fraction, "bagging_freq": 1, "lambda_l1": cfg.lambda_l1,
              "lambda_l2": cfg.lambda_l2, "num_threads": cfg.threads, "seed": seed, "deterministic": True,
              "force_row_wise": True, "verbosity": -1}
    params.update({"objective": "binary"} if n_class == 2 else {"objective": "multiclass", "num_class": n_class})
    booster = lightgbm.train(params, lightgbm.Dataset(X_tr, y_tr), num_boost_round=cfg.rounds)
    return booster.predict(X_te, num_threads=cfg.threads)


def probe(X: np.ndarray, y: np.ndarray, task: str = "binary", folds: int = 5, seed: int = 0,
          repeats: int = 1, cfg: ProbeConfig | None = None) -> dict:
    """Stratified k-fold CV of LightGBM on (X, y): ROC-AUC for `binary`, accuracy for `multiclass`.

    Repeat r uses folds and booster seed `seed + r`. Returns mean and std (population, over all
    folds x repeats) and the per-fold values in order."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1, got {repeats}")
    cfg = cfg or ProbeConfig()
    X = np.asarray(X, dtype=np.float32)
    classes, y_idx = np.unique(np.asarray(y), return_inverse=True)
    if task == "binary" and len(classes) != 2:
        raise ConfigError(f"a binary task needs 2 classes, got {len(classes)}")
    scores = []
    for r in range(repeats):
        fold = stratified_folds(y_idx, folds, seed + r)
        for f in range(folds):
            te = fold == f
            p = _fit_predict(X[~te], y_idx[~te], X[te], len(classes), cfg, seed + r)
            scores.append(roc_auc(p, y_idx[te]) if task == "binary" else float(np.mean(p.argmax(1) == y_idx[te])))
    s = np.asarray(scores)
    return {"mean": float(s.mean()), "std": float(s.std()), "per_fold": [round(float(v), 6) for v in s]}


# --- targets ----------------------------------------------------------------------------------------

def _profile_column(run: RunDir, column: str, target: str) -> pl.DataFrame:
    path = run.profile
    cols = pl.read_parquet_schema(path).names() if path.is_file() else []
    if column not in cols:
        raise ConfigError(f"target {target!r} needs column {column!r} in {path} "
                          f"(this run has: {', '.join(c for c in cols if c not in ('user_idx', 'user_id')) or 'none'})")
    return pl.read_parquet(path, columns=["user_idx", column]).drop_nulls(column)


def _gender(run: RunDir) -> pl.DataFrame:
    df = _profile_column(run, "gender", "gender")
    return df.select("user_idx", (pl.col("gender").cast(pl.Utf8).str.to_uppercase() == "F").cast(pl.Int64).alias("y"))


def _age(run: RunDir) -> pl.DataFrame:
    df = _profile_column(run, "age", "age")
    age = pl.col("age").cast(pl.Float64)
    bucket = pl.when(age < AGE_EDGES[0]).then(0).when(age < AGE_EDGES[1]).then(1).when(age < AGE_EDGES[2]).then(2)
    return df.select("user_idx", bucket.otherwise(3).cast(pl.Int64).alias("y"))


def _persona(run: RunDir) -> pl.DataFrame:
    df = _profile_column(run, "persona", "persona")
    codes = {v: i for i, v in enumerate(sorted(df["persona"].cast(pl.Utf8).unique().to_list()))}
    return df.select("user_idx", pl.col("persona").cast(pl.Utf8).replace_strict(codes).cast(pl.Int64).alias("y"))


def _fraud_victim(run: RunDir) -> pl.DataFrame:
    if "label" not in run.event_columns():
        raise ConfigError(f"target 'fraud_victim' needs a 'label' column in {run.events}: this dataset has no labels")
    return (run.scan_events().group_by("user_idx").agg((pl.col("label") == 1).any().cast(pl.Int64).alias("y"))
            .collect())


@dataclass(frozen=True)
class Target:
    task: str
    about: str
    build: Callable[[RunDir], pl.DataFrame]  # -> user_idx, y (0..C-1)
    profile_column: str | None = None  # the profile.parquet column the label is made from


TARGETS = {
    "gender": Target("binary", "profile gender, F = 1 (MovieLens-100k; on the simulator a noise control)", _gender,
                     "gender"),
    "age": Target("multiclass", "profile age in buckets " + " / ".join(AGE_BUCKETS), _age, "age"),
    "persona": Target("multiclass", "the simulator's hidden persona (6 classes, never a model input)", _persona,
                      "persona"),
    "fraud_victim": Target("binary", "any fraud-labelled event in the user's history", _fraud_victim),
}


def user_targets(run_dir: RunDir | str | Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(user_idx, y) of the users that have the target `name` (see TARGETS), sorted by user_idx."""
    if name not in TARGETS:
        raise ConfigError(f"unknown target {name!r}; valid: {', '.join(TARGETS)}")
    df = TARGETS[name].build(RunDir.of(run_dir).require()).sort("user_idx")
    return df["user_idx"].cast(pl.Int64).to_numpy(), df["y"].to_numpy().astype(np.int64)


# --- representations --------------------------------------------------------------------------------

def check_no_profile_leak(run_dir: RunDir | str | Path, name: str, target: str) -> None:
    """Refuse a trained model that read the target's profile column as an input (see module docstring)."""
    column = TARGETS[target].profile_column
    if column is None or not RunDir.of(run_dir).model_dir(name).is_dir():
        return
    inputs = profile_inputs(run_dir, name)
    if column in inputs:
        raise ConfigError(
            f"model {name!r} was trained with the profile field {column!r} as an input (profile fields "
            f"{', '.join(inputs)}): its weights have seen every user's {target}, the held-out folds' too, so a "
            f"probe of {target!r} would measure the label, not the behaviour. Train a model for the probe with "
            f"--set 'model.profile_mode=\"none\"' (pantherseq pretrain --name NAME ...)")


def _aggregates(run: RunDir, split: str, history: str, profile: str) -> np.ndarray:
    return aggregate_features(run, split)[1]


def _random(run: RunDir, split: str, history: str, profile: str) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n_users(run), RANDOM_DIM)).astype(np.float32)


# name -> builder(run, split, history, profile) -> (U, D); any other name is a trained model or a file
REPRESENTATIONS: dict[str, Callable[[RunDir, str, str, str], np.ndarray]] = {
    "aggregates": _aggregates,  # hand-made aggregates of each user's events (representation.py)
    "random": _random,  # a label-free control
}


def _embeddings_file(run: RunDir, name: str) -> np.ndarray:
    """RUN/NAME/embeddings.npy (e.g. `llm4es`, `coles`) or the .npy file `name`, checked to be (U, D)."""
    path = Path(name) if name.endswith(".npy") else run.embeddings_dir(name).embeddings
    if not path.is_file():
        models = sorted(p.name for p in run.models.glob("*") if p.is_dir())
        raise ConfigError(f"unknown representation {name!r}: not {' or '.join(REPRESENTATIONS)}, no model "
                          f"{run.model_dir(name)}, no file {path} (trained models: {', '.join(models) or 'none'})")
    X = np.load(path)
    U = n_users(run)
    if X.ndim != 2 or X.shape[0] != U:
        raise ConfigError(f"{path} has shape {X.shape}; expected ({U}, D): one row per user_idx")
    return X.astype(np.float32)


def load_representation(run_dir: RunDir | str | Path, name: str, split: str = "all", history: str = "full",
                        profile: str = "mean") -> np.ndarray:
    """(U, D) float32, row u = user_idx u (NaN rows: users without events), for one of:
    a name in REPRESENTATIONS (`aggregates`, `random`); a model trained under RUN/models/NAME;
    RUN/NAME/embeddings.npy (e.g. `llm4es`, `coles`); a path to a .npy file."""
    run = RunDir.of(run_dir).require()
    if name in REPRESENTATIONS:
        return REPRESENTATIONS[name](run, split, history, profile)
    if run.model_dir(name).is_dir():
        return user_embeddings(run, name, split, history=history, profile=profile)[1]
    return _embeddings_file(run, name)


def run_probe(run_dir: RunDir | str | Path, names: list[str], target: str, folds: int = 5, seed: int = 0,
              repeats: int = 1, split: str = "all", history: str = "full", profile: str = "mean",
              cfg: ProbeConfig | None = None, progress: bool = True) -> dict:
    """Probe every representation in `names` (`a+b` = concatenated) on `target` with the same folds;
    merge the report into RUN/probe.json under the target's name and return it."""
    run = RunDir.of(run_dir).require()
    cfg = cfg or ProbeConfig()
    users, y = user_targets(run, target)  # fails fast on a bad target, before any embedding is computed
    task = TARGETS[target].task
    parts = {p: None for name in names for p in name.split("+")}
    for p in parts:
        check_no_profile_leak(run, p, target)
    for p in parts:  # load everything first: a bad name fails before minutes of probing
        parts[p] = load_representation(run, p, split, history, profile)
    results = {}
    bar = tqdm(names, desc=f"probe {target}", unit="repr", disable=None if progress else True)
    for name in bar:
        X = np.hstack([parts[p][users] for p in name.split("+")])
        bar.set_postfix_str(f"{name} ({X.shape[1]} columns)")
        results[name] = {**probe(X, y, task, folds, seed, repeats, cfg), "dim": int(X.shape[1])}
        log.info("%s on %s: %.4f ± %.4f", name, target, results[name]["mean"], results[name]["std"])
    report = {"target": target, "about": TARGETS[target].about, "task": task, "metric": METRIC[task],
              "users": len(y), "class_counts": np.bincount(y).tolist(), "folds": folds, "repeats": repeats,
              "seed": seed, "split": split, "history": history, "profile": profile, "lgbm": asdict(cfg),
              "results": results}
    merged = read_json(run.probe_report) or {}
    merged[target] = report
    run.probe_report.write_text(json.dumps(merged, indent=1) + "\n")
    return report


def format_probe_table(report: dict) -> str:
    head = (f"{report['target']} ({report['task']}, {report['metric']}; {report['users']:,} users, "
            f"{report['folds']} folds x {report['repeats']}, seed {report['seed']})")
    width = max(len("representation"), *(len(n) for n in report["results"]))
    lines = [head, f"  {'representation':<{width}}  {'dim':>5}  {'mean':>7}  {'std':>7}"]
    for name, r in report["results"].items():
        lines.append(f"  {name:<{width}}  {r['dim']:>5}  {r['mean']:>7.4f}  {r['std']:>7.4f}")
    return "\n".join(lines)
