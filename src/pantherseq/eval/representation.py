"""Frozen per-user representations for the user-level probes (SPEC §10), row u = user_idx u.

    user_embeddings(run_dir, model_name)   a trained next-event model's pooled embedding of each history
    aggregate_features(run_dir)            hand-made aggregates of each user's events (Polars, vectorised)

`split` limits each history to the events up to the end of that split (`train`: the training period
only; `all`: every event). Decisions for model embeddings:
- history `full` (default): the history is cut into windows of the model's max_len events, aligned to
  its end (the last window is the most recent max_len events, the first may be shorter); the embedding
  is the mean of `model.embed` (the mean causal state) over the windows, weighted by their lengths, so
  every event counts once, as in the aggregates. `last`: only the last window.
- profile `mean` (default): PANTHER adds the profile embedding e_u (age, gender, ... — the very labels
  being probed) to every input; here every user gets the population mean of e_u instead, so the
  embedding carries behaviour only. `keep` uses each user's own profile (leaks profile targets).
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from pantherseq.data.schema import DAY
from pantherseq.data.split import SPLIT_NAMES
from pantherseq.errors import ConfigError
from pantherseq.run import RunDir

log = logging.getLogger(__name__)

SPLITS = ("all", *SPLIT_NAMES)
HISTORIES = ("full", "last")
PROFILES = ("mean", "keep")
RANDOM_DIM = 64  # width of the `random` control representation
MAX_CATEGORY_VALUES = 50  # share columns per categorical field (its most frequent values)


def n_users(run_dir: RunDir | str | Path) -> int:
    run = RunDir.of(run_dir).require()
    return pl.scan_parquet(run.users).select(pl.len()).collect().item()


def _check(value: str, valid: tuple[str, ...], what: str) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def history_ends(offsets: np.ndarray, split_codes: np.ndarray, split: str) -> np.ndarray:
    """(U,) end row of each user's history up to the end of `split` (a split's events form a prefix)."""
    if split == "all":
        return offsets[1:].astype(np.int64)
    cum = np.concatenate([[0], np.cumsum(np.asarray(split_codes) <= SPLIT_NAMES.index(split))])
    return offsets[:-1] + (cum[offsets[1:]] - cum[offsets[:-1]])


def user_windows(offsets: np.ndarray, ends: np.ndarray, max_len: int, history: str = "full"
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, length, user) of the windows covering [offsets[u], ends[u]) (see module docstring)."""
    begins = offsets[:-1].astype(np.int64)
    n = ends - begins
    k = np.where(n > 0, 1, 0) if history == "last" else -(-n // max_len)
    user = np.repeat(np.arange(len(n)), k)
    j = np.arange(len(user)) - np.repeat(np.cumsum(k) - k, k)  # 0 = the most recent window
    w_end = ends[user] - j * max_len
    start = np.maximum(begins[user], w_end - max_len)
    return start, w_end - start, user


class _ConstantProfile(nn.Module):
    """Stands in for a ProfileEncoder: the same e_u (D,) for every user of a batch."""

    def __init__(self, e: torch.Tensor):
        super().__init__()
        self.register_buffer("e", e)

    def forward(self, batch) -> torch.Tensor:
        return self.e.expand(batch.tokens.shape[0], -1)


def profile_inputs(run_dir: RunDir | str | Path, model_name: str) -> list[str]:
    """The profile fields the model trained under RUN/models/NAME reads as inputs ([] when none)."""
    from pantherseq.train.checkpoint import load_model

    model, _ = load_model(run_dir, model_name)
    if getattr(model, "profile", None) is None:
        return []
    return [f.name for f in RunDir.of(run_dir).config().profile.fields]


@torch.no_grad()
def user_embeddings(run_dir: RunDir | str | Path, model_name: str, split: str = "all", history: str = "full",
                    profile: str = "mean", batch_size: int = 256, progress: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(user_idx (U,), X (U, D) float32) from the model trained under RUN/models/NAME; NaN rows for
    users without events in the history."""
    from pantherseq.data.dataset import RunData
    from pantherseq.train.checkpoint import load_model

    _check(split, SPLITS, "split")
    _check(history, HISTORIES, "history")
    _check(profile, PROFILES, "profile")
    model, ckpt = load_model(run_dir, model_name)
    if not hasattr(model, "embed"):
        raise ConfigError(f"model {model_name!r} ({ckpt['model_name']}) has no user embedding: "
                          "use a neural model (panther, transformer, sasrec, hstu)")
    data = RunData(RunDir.of(run_dir).path)
    if profile == "mean" and getattr(model, "profile", None) is not None:
        everyone = SimpleNamespace(profile_cat=data.profile.cat, profile_num=data.profile.num)
        e_u = model.profile(everyone)  # (U, D); ProfileEncoder reads these two fields only
        model.profile = _ConstantProfile(e_u.mean(0))
    seq = data.seq
    start, length, user = user_windows(np.asarray(seq.offsets), history_ends(seq.offsets, seq.split, split),
                                       model.cfg.max_len, history)
    U, D = seq.n_users, model.cfg.d_model
    total, weight = np.zeros((U, D)), np.zeros(U)
    for i in tqdm(range(0, len(start), batch_size), desc=f"embed {model_name}", disable=None if progress else True,
                  leave=False):
        sl = slice(i, i + batch_size)
        e = model.embed(data._batch(start[sl], length[sl])).double().numpy()  # (B, D)
        np.add.at(total, user[sl], e * length[sl, None])
        np.add.at(weight, user[sl], length[sl])
    with np.errstate(invalid="ignore", divide="ignore"):
        X = total / weight[:, None]
    return np.arange(U), X.astype(np.float32)


def _category_exprs(events: pl.LazyFrame, name: str) -> list[pl.Expr]:
    """Shares of each value (at most MAX_CATEGORY_VALUES values), else of the MAX_CATEGORY_VALUES most
    frequent ones plus the number of distinct values and their mean popularity (log count in the run)."""
    c = pl.col(name).cast(pl.Utf8)
    counts = events.select(c.drop_nulls().value_counts(sort=True)).unnest(name).collect()
    top = counts[name].to_list()[:MAX_CATEGORY_VALUES]
    exprs = [(c == v).mean().alias(f"{name}={v}") for v in top]
    if counts.height > MAX_CATEGORY_VALUES:
        log_count = dict(zip(counts[name].to_list(), np.log(counts["count"].to_numpy()).tolist()))
        exprs += [c.n_unique().alias(f"{name}_distinct"),
                  c.replace_strict(log_count, default=None, return_dtype=pl.Float64).mean().alias(f"{name}_popularity")]
    return exprs


def _label_exprs(events: pl.LazyFrame, name: str, separator: str) -> list[pl.Expr]:
    """For a field whose values are sets of labels: the share of events whose set holds each label (of its
    MAX_CATEGORY_VALUES most frequent labels)."""
    labels = pl.col(name).cast(pl.Utf8).str.split(separator)
    counts = events.select(labels.explode(empty_as_null=True).value_counts(sort=True)).unnest(name).collect()
    top = [v for v in counts[name].to_list() if v][:MAX_CATEGORY_VALUES]
    return [labels.list.contains(v).mean().alias(f"{name}={v}") for v in top]


def aggregate_features(run_dir: RunDir | str | Path, split: str = "all") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(user_idx (U,), X (U, F) float32, feature names) from RUN/events.parquet, one Polars group_by.

    Per user: event count, active span in days, events per day (count / (span + 1)), mean and median
    gap in seconds; mean / std / min / max of every numeric field; the share of each value of every
    categorical field (of its MAX_CATEGORY_VALUES most frequent values, with the number of distinct values
    and their mean popularity when there are more; for a field with a `separator`, the share of events
    holding each label of the set instead); hour-of-day (24) and weekday (7) shares. Item side-table fields
    (`[items]`) are event fields here like any other (MovieLens: genre shares, release-year statistics).
    Labels and scenarios are never features. Users without events: count 0, other columns NaN."""
    _check(split, SPLITS, "split")
    run = RunDir.of(run_dir).require()
    cfg = run.config()
    events = run.scan_events()
    if split != "all":
        events = events.filter(pl.col("split") <= SPLIT_NAMES.index(split))
    cols = set(events.collect_schema().names())
    ts = pl.col("timestamp")
    span = (ts.max() - ts.min()).dt.total_seconds() / DAY
    exprs = [pl.len().alias("count"), span.alias("span_days"), (pl.len() / (span + 1)).alias("events_per_day")]
    if "gap_s" in cols:
        exprs += [pl.col("gap_s").mean().alias("gap_mean_s"), pl.col("gap_s").median().alias("gap_median_s")]
    for f in cfg.fields:
        if f.name not in cols:
            continue
        c = pl.col(f.name)
        if f.kind == "numeric":
            exprs += [c.mean().alias(f"{f.name}_mean"), c.std(ddof=0).alias(f"{f.name}_std"),
                      c.min().alias(f"{f.name}_min"), c.max().alias(f"{f.name}_max")]
        elif f.separator is not None:
            exprs += _label_exprs(events, f.name, f.separator)
        elif f.kind == "categorical":
            exprs += _category_exprs(events, f.name)
    exprs += [(ts.dt.hour() == h).mean().alias(f"hour={h:02d}") for h in range(24)]
    exprs += [(ts.dt.weekday() == d).mean().alias(f"weekday={d}") for d in range(1, 8)]
    agg = events.group_by(pl.col("user_idx").cast(pl.Int64)).agg(exprs).collect()
    users = pl.DataFrame({"user_idx": np.arange(n_users(run), dtype=np.int64)})
    table = users.join(agg, on="user_idx", how="left").sort("user_idx").with_columns(pl.col("count").fill_null(0))
    names = [c for c in table.columns if c != "user_idx"]
    X = table.select(pl.col(names).cast(pl.Float32)).to_numpy()
    return table["user_idx"].to_numpy(), X, names
