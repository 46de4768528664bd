"""The `prepare` stage: raw events -> validated events, fitted tokenizer, token sequences, split, report.

    prepare(cfg, run_dir, force=False) -> dict   (the contents of prepare.json)
    prepare(cfg, run_dir, tokenizer_from=RUN)    the same, re-using RUN's fitted tokenizer (a byte-for-byte
                                                 copy of RUN/tokenizer.json: RUN's models load as they are)
    format_prepare_report(report) -> str         (its terminal summary)

`cfg.users` keeps a seeded part of the users (data/split.py `chosen_users`); the others are counted in
`rows_dropped` as `user_not_chosen`.

Writes into the run directory (never modifying its inputs; the names are `RunDir`'s, run.py). A run
directory that already holds trained models is refused unless `force` (they would no longer fit it).
    prepare.json       counts that reconcile (rows_read = rows_kept + sum(rows_dropped)), coverage, split
    config.toml        the resolved dataset config
    tokenizer.json     the fitted StructuredTokenizer (human-readable)
    events.parquet     the kept canonical events, sorted, with user index, gap, split and token
    users.parquet      user index -> user_id, event counts
    profile.parquet    the profile of the kept users in user-index order (when the dataset has one)
    items.parquet      the item side table joined to the events (when the dataset has one; data/items.py)
    sequences/         the memory-mappable arrays of `data/sequences.py` (`sequences.shards` shards)

Two engines compute the same outputs: `polars` (this module, one process) and `spark`
(`spark/prepare.py`, PySpark). They share every decision that is not a data-parallel loop: the
tokenizer's fitting from statistics, the report from a `Facts` record, the one-line errors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pantherseq.config import save_toml
from pantherseq.data.items import source_names
from pantherseq.data.schema import EVENT_ID, GAP, LABEL, SCENARIO, TIME, UNK, USER, DatasetConfig
from pantherseq.data.sequences import Sequences
from pantherseq.data.sources import FILE, ROW, Loaded, load_source
from pantherseq.data.split import (
    SPLIT,
    SPLIT_NAMES,
    TRAIN,
    chosen_users,
    split_counts,
    split_expr,
    split_summary,
)
from pantherseq.errors import ConfigError, DataError
from pantherseq.run import RunDir
from pantherseq.tokenizer import StructuredTokenizer

log = logging.getLogger(__name__)
USER_IDX = "user_idx"
TOKEN = "token"
ENGINES = ("polars", "spark")


@dataclass
class Facts:
    """The counts prepare.json reports, computed by either engine (events are the kept ones)."""

    files: list[str]
    rows_read: int
    rows_kept: int
    rows_dropped: dict[str, int]
    users: int
    split_rows: list[dict]  # data/split.py's split_counts: {split, events, users} per split present
    known_by_split: dict[int, int]  # split code -> events whose token is not UNK
    unk_users: int  # users with at least one UNK event
    labels: dict[str, Any] = field(default_factory=dict)
    profile_fields: list[str] = field(default_factory=list)
    items: dict[str, Any] = field(default_factory=dict)  # data/items.py join_items' stats


def drop_duplicate_ids(frame: pl.DataFrame, bad_rows: str, dropped: dict[str, int]) -> pl.DataFrame:
    if EVENT_ID not in frame.columns:
        return frame
    dup = frame[EVENT_ID].is_duplicated()
    if not dup.any():
        return frame
    if bad_rows == "error":
        rows = frame.filter(dup).sort(EVENT_ID, maintain_order=True).head(2).rows(named=True)
        first, second = rows[0], rows[1]
        raise DataError(f"duplicate event id (also at file {first[FILE]}, row {first[ROW]})",
                        file=second[FILE], row=second[ROW], column=EVENT_ID, value=second[EVENT_ID])
    keep = frame[EVENT_ID].is_first_distinct()
    dropped["duplicate_event_id"] = int((~keep).sum())
    return frame.filter(keep)


def order_events(frame: pl.DataFrame, cfg: DatasetConfig, dropped: dict[str, int]) -> pl.DataFrame:
    """Sort by user then time (stable: ties keep file order), add gap_s, drop too-short users."""
    frame = frame.sort([USER, TIME], maintain_order=True)
    if cfg.split.min_events > 1:
        n = pl.len().over(USER)
        short = frame.select((n < cfg.split.min_events).alias("s"))["s"]
        if short.any():
            dropped["user_too_short"] = int(short.sum())
            frame = frame.filter(~short)
    gap = (pl.col(TIME).diff().dt.total_microseconds() / 1e6).over(USER).alias(GAP)
    return frame.with_columns(gap)


def select_users(frame: pl.DataFrame, cfg: DatasetConfig, dropped: dict[str, int]) -> pl.DataFrame:
    """Keep the users of `cfg.users` (all by default); the rest are counted as `user_not_chosen`."""
    if cfg.users.all:
        return frame
    keep = frame[USER].is_in(list(chosen_users(frame[USER].unique().to_list(), cfg.users)))
    dropped["user_not_chosen"] = int((~keep).sum())
    return frame.filter(keep)


# tokenizer settings a run may not change when it re-uses another run's tokenizer (the reading ones may)
READING_KEYS = ("column", "required", "min_value")


def tokenizer_of(source: RunDir | str | Path, cfg: DatasetConfig) -> tuple[StructuredTokenizer, Path]:
    """RUN's fitted tokenizer and its file, for a config whose fields and token fields are RUN's (the way
    each field is read from the files may differ); one ConfigError line otherwise."""
    run = RunDir.of(source).require()
    tok = run.tokenizer()
    theirs = {f.name: f for f in tok.fields}
    names = [f.name for f in cfg.fields]
    if names != tok.field_names or cfg.tokenizer.fields != tok.token_fields:
        raise ConfigError(f"--tokenizer-from {run}: its fields {tok.field_names} (token {tok.token_fields}) differ "
                          f"from this config's {names} (token {cfg.tokenizer.fields}): give the same fields")
    for f in cfg.fields:
        mine, other = (dataclasses.asdict(x) for x in (f, theirs[f.name]))
        diff = [k for k in mine if k not in READING_KEYS and mine[k] != other[k]]
        if diff:
            raise ConfigError(f"--tokenizer-from {run}: field {f.name!r} has {diff[0]} = {mine[diff[0]]!r} here "
                              f"but {other[diff[0]]!r} in its tokenizer")
    return tok, run.tokenizer_file


def _user_table(frame: pl.DataFrame) -> pl.DataFrame:
    return (frame.group_by(USER, maintain_order=True)
            .agg(pl.len().alias("events"), pl.col(TIME).min().alias("first"), pl.col(TIME).max().alias("last"))
            .with_row_index(USER_IDX))


def _sequences(frame: pl.DataFrame, users: pl.DataFrame, codes: np.ndarray, tok: StructuredTokenizer
               ) -> Sequences:
    counts = users["events"].to_numpy().astype(np.int64)
    label = frame[LABEL].fill_null(-1).cast(pl.Int8).to_numpy() if LABEL in frame.columns \
        else np.full(frame.height, -1, np.int8)
    scenario = frame[SCENARIO].cast(pl.Int16).to_numpy() if SCENARIO in frame.columns \
        else np.zeros(frame.height, np.int16)
    return Sequences(
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        tokens=frame[TOKEN].to_numpy().astype(np.int32),
        codes=codes.astype(np.int32),
        time=(frame[TIME].dt.epoch("us").to_numpy() // 1_000_000).astype(np.int64),
        gap=frame[GAP].fill_null(float("nan")).to_numpy().astype(np.float32),
        label=label, scenario=scenario,
        split=frame[SPLIT].to_numpy().astype(np.int8),
        field_names=tok.field_names,
    )


def _profile(loaded: Loaded, users: pl.DataFrame) -> pl.DataFrame | None:
    if loaded.profile is None:
        return None
    return users.select(USER_IDX, USER).join(loaded.profile, on=USER, how="left").sort(USER_IDX)


def label_counts(positive: int, unknown: int, by_scenario: list[tuple[int, int]] | None) -> dict[str, Any]:
    """prepare.json's `labels` from counts: positives, unknown labels, events per fraud scenario > 0."""
    out: dict[str, Any] = {"positive": int(positive), "unknown": int(unknown)}
    if by_scenario is not None:
        out["by_scenario"] = {str(s): int(n) for s, n in sorted(by_scenario)}
    return out


def _labels(frame: pl.DataFrame) -> dict[str, Any]:
    if LABEL not in frame.columns:
        return {}
    scenarios = None
    if SCENARIO in frame.columns:
        scenarios = frame.filter(pl.col(SCENARIO) > 0).group_by(SCENARIO).len().rows()
    return label_counts(int((frame[LABEL] == 1).sum()), int(frame[LABEL].is_null().sum()), scenarios)


def check_out(run: RunDir, force: bool) -> None:
    """The run directory must be a directory, and not hold trained models unless `force`."""
    if run.path.exists() and not run.path.is_dir():
        raise ConfigError(f"--out {run}: a file is in the way; the run directory must be a directory")
    trained = run.trained_models() if run.path.is_dir() else []
    if trained and not force:
        raise ConfigError(f"--out {run} holds trained models ({', '.join(trained[:5])}) that would no longer "
                          "fit a prepared-again run: use another --out, or --force to prepare it anyway")


def check_split(present: set[int], cfg: DatasetConfig) -> None:
    """Every split must have events: evaluation (valid, test) has nothing to measure otherwise."""
    for code, name in enumerate(SPLIT_NAMES):
        if code not in present:
            rule = (f"t1 = {cfg.split.t1}, t2 = {cfg.split.t2}" if cfg.split.kind == "time"
                    else "every user has fewer than 3 events")
            raise DataError(f"split {cfg.split.kind}: the {name} part is empty ({rule}): set split.t1 / split.t2 "
                            "inside the data's time range")


def save_tokenizer(run: RunDir, tok: StructuredTokenizer, reused_file: Path | None) -> None:
    """The run's tokenizer.json: the fitted one, or a byte-for-byte copy of the re-used one (the same SHA-256:
    train/warmstart.py and the serving identity compare it)."""
    if reused_file is None:
        tok.save(run.tokenizer_file)
    elif reused_file.resolve() != run.tokenizer_file.resolve():
        shutil.copyfile(reused_file, run.tokenizer_file)


def clear_sequences(run: RunDir) -> None:
    """Remove an earlier prepare's sequences (its shard count may differ)."""
    if run.sequences.is_dir():
        shutil.rmtree(run.sequences)


def _write(run: RunDir, cfg: DatasetConfig, tok: StructuredTokenizer, frame: pl.DataFrame, users: pl.DataFrame,
           codes: np.ndarray, profile: pl.DataFrame | None, tok_file: Path | None = None,
           items: pl.DataFrame | None = None) -> None:
    log.info("writing %s", run)
    run.path.mkdir(parents=True, exist_ok=True)
    save_tokenizer(run, tok, tok_file)
    save_toml(cfg, run.config_file)
    clear_sequences(run)
    _sequences(frame, users, codes, tok).save_shards(run.sequences, cfg.sequences.shards)
    users.write_parquet(run.users)
    frame.drop(FILE, ROW).write_parquet(run.events)
    if profile is not None:
        profile.write_parquet(run.profile)
    write_items(run, cfg, items)


def write_items(run: RunDir, cfg: DatasetConfig, items: pl.DataFrame | None) -> None:
    """RUN/items.parquet: the joined item table under its file's column names (none: removed)."""
    run.items.unlink(missing_ok=True)
    if items is not None:
        source_names(items, cfg).write_parquet(run.items)


def prepare(cfg: DatasetConfig, run_dir: RunDir | str | Path, force: bool = False, engine: str = "polars",
            spark_master: str | None = None, tokenizer_from: RunDir | str | Path | None = None) -> dict[str, Any]:
    """Prepare a run directory with `engine` (polars | spark; `spark_master` overrides `spark.master`), fitting
    a tokenizer on its training period or re-using `tokenizer_from`'s (a prepared run)."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if cfg.table is not None and engine != "spark":
        raise ConfigError(f"table {cfg.table!r} is read from the Spark catalog: prepare it with --engine spark")
    started = time.perf_counter()
    run = RunDir.of(run_dir)
    check_out(run, force)
    reused = tokenizer_of(tokenizer_from, cfg) if tokenizer_from is not None else None
    if reused is not None:
        cfg = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, top_k=reused[0].top_k))
    if engine == "spark":
        from pantherseq.spark.prepare import prepare_spark

        tok, facts = prepare_spark(cfg, run, spark_master, reused)
    else:
        tok, facts = _prepare_polars(cfg, run, reused)
    report = build_report(cfg, tok, facts, time.perf_counter() - started)
    if tokenizer_from is not None:
        report["tokenizer_from"] = str(RunDir.of(tokenizer_from))
    run.prepare_report.write_text(json.dumps(report, indent=1, default=str))
    return report


def _prepare_polars(cfg: DatasetConfig, run: RunDir, reused: tuple[StructuredTokenizer, Path] | None = None
                    ) -> tuple[StructuredTokenizer, Facts]:
    log.info("reading %s", cfg.source)
    loaded = load_source(cfg)
    dropped = dict(loaded.dropped)
    frame = drop_duplicate_ids(loaded.events, cfg.bad_rows, dropped)
    frame = select_users(order_events(frame, cfg, dropped), cfg, dropped)
    if frame.height == 0:
        raise DataError(f"no events left after dropping {dropped}")
    frame = frame.with_columns(split_expr(cfg.split))
    check_split(set(frame[SPLIT].unique().to_list()), cfg)
    if reused is not None:
        tok = reused[0]
        log.info("re-using the tokenizer %s", reused[1])
    else:
        log.info("fitting the tokenizer on %d training events", int((frame[SPLIT] == TRAIN).sum()))
        tok = StructuredTokenizer.from_config(cfg).fit(frame.filter(pl.col(SPLIT) == TRAIN))
    encoded = tok.transform(frame)
    users = _user_table(frame)
    user_idx = np.repeat(users[USER_IDX].to_numpy(), users["events"].to_numpy())  # frame is user-major
    frame = frame.with_columns(pl.Series(TOKEN, encoded.tokens), pl.Series(USER_IDX, user_idx))
    profile = _profile(loaded, users)
    _write(run, cfg, tok, frame, users, encoded.codes, profile, reused[1] if reused else None, loaded.items)
    known = frame.group_by(SPLIT).agg((pl.col(TOKEN) != UNK).sum().alias("n"))
    unk = frame.group_by(USER).agg((pl.col(TOKEN) == UNK).any().alias("u"))["u"]
    return tok, Facts(
        files=loaded.files, rows_read=loaded.rows_read, rows_kept=frame.height, rows_dropped=dropped,
        users=users.height, split_rows=split_counts(frame),
        known_by_split={int(k): int(n) for k, n in known.iter_rows()}, unk_users=int(unk.sum()),
        labels=_labels(frame),
        profile_fields=[] if profile is None else [c for c in profile.columns if c not in (USER_IDX, USER)],
        items=loaded.item_stats)


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def build_report(cfg: DatasetConfig, tok: StructuredTokenizer, facts: Facts, wall_s: float) -> dict[str, Any]:
    """prepare.json from the fitted tokenizer and the engine's `Facts` (rows must reconcile)."""
    split = split_summary(facts.split_rows, cfg.split)
    events = [split["events"][name] for name in SPLIT_NAMES]
    known = [facts.known_by_split.get(i, 0) for i in range(len(SPLIT_NAMES))]
    report = {
        "dataset": cfg.name,
        "source": cfg.source,
        "files": facts.files,
        "rows_read": facts.rows_read,
        "rows_kept": facts.rows_kept,
        "rows_dropped": facts.rows_dropped,
        "users": facts.users,
        "raw_combinations": tok.stats["raw_combinations"],
        "vocab_size": tok.vocab_size,
        "top_k": tok.top_k,
        "token_fields": tok.token_fields,
        "coverage": _share(sum(known), sum(events)),
        "coverage_by_split": {name: _share(k, n) for name, k, n in zip(SPLIT_NAMES, known, events)},
        "unk_users": _share(facts.unk_users, facts.users),
        "k_for_96pct": tok.stats["k_for_96pct"],
        "coverage_curve": tok.stats["coverage_curve"],
        "field_sizes": dict(zip(tok.field_names, tok.field_sizes)),
        "split": split,
        "labels": facts.labels,
        "profile_fields": facts.profile_fields,
        **({"items": facts.items} if facts.items else {}),
        "shards": cfg.sequences.shards,
        "wall_s": round(wall_s, 3),
    }
    if report["rows_kept"] + sum(facts.rows_dropped.values()) != report["rows_read"]:
        raise AssertionError(f"row counts do not reconcile: {report['rows_read']} read, "
                             f"{report['rows_kept']} kept, {facts.rows_dropped} dropped")
    return report


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "-"
    return str(value)


def format_prepare_report(report: dict[str, Any]) -> str:
    """The terminal summary of prepare.json."""
    split = report["split"]
    rows = [
        ("dataset", f"{report['dataset']} ({report['source']})"),
        ("rows read / kept", f"{report['rows_read']:,} / {report['rows_kept']:,}"),
        ("rows dropped", _fmt(report["rows_dropped"])),
        ("users", f"{report['users']:,}"),
        ("token fields", " x ".join(report["token_fields"])),
        ("raw combinations", f"{report['raw_combinations']:,}"),
        ("vocabulary", f"{report['vocab_size']:,} (top_k {report['top_k']:,})"),
        ("coverage", f"{report['coverage']:.2%} of kept events (96% needs K = {report['k_for_96pct']:,})"),
        ("users with any UNK", f"{report['unk_users']:.2%}"),
        ("split", f"{split['kind']}: events {_fmt(split['events'])}"),
        ("labels", _fmt(report.get("labels") or {})),
        ("wall time", f"{report['wall_s']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
