"""Events as text (LLM4ES, Shestov et al., §3.1 "event sequence to text"): one readable line per event.

    texts = serialise_users(run_dir, TextConfig(format="plain", max_events=100))
    # -> Polars frame: user_idx, user_id, n_events, header, body, text   (one row per user, user_idx order)

A user's text is a *header* (the profile as `name: value` pairs; for `markdown` also the table's head row)
and a *body* (the newest `max_events` events, oldest first, one line each):

    plain     time=2024-03-01 18:02 Fri, channel=chip, amount=35.40, category=grocery, merchant_id=m00017
    json      {"time":"2024-03-01 18:02 Fri","channel":"chip","amount":"35.40","category":"grocery",...}
    markdown  | 2024-03-01 18:02 Fri | chip | 35.40 | grocery | m00017 |

Readable values: time as `YYYY-MM-DD HH:MM Www`, numeric fields with 2 decimals, categorical values as text,
mapped through `descriptions[field]` when given (the paper's MCC code -> category description; for
MovieLens-100k the item table shipped with the ratings gives each movie's title, year and genres). Label,
scenario and event id are never written: they are targets, not behaviour.

Decisions the paper leaves open:
- budget: events beyond `max_events` are dropped oldest first, then oldest events are dropped until
  header + body fit `max_chars` (the newest event is always kept). The header is split off so a tokenizer
  can truncate the body from the left and keep the header (`model.encode_texts`).
- profile: the header holds the dataset config's profile fields (never hidden columns such as the
  simulator's `persona`). A profile field that is also a downstream target (MovieLens gender, age) puts
  the answer into the text: leave it out with `profile_fields=[...]` for those evaluations.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from pantherseq.data.schema import TIME, USER, DatasetConfig
from pantherseq.data.split import SPLIT, SPLIT_NAMES
from pantherseq.errors import ConfigError, DataError
from pantherseq.run import RunDir

log = logging.getLogger(__name__)
USER_IDX = "user_idx"
TEXT_FORMATS = ("plain", "json", "markdown")
TIME_NAME = "time"
MISSING = "unknown"
_LINE, _KEEP = "_line", "_keep"


@dataclass
class TextConfig:
    """How events become text. `profile_fields` None = the dataset's profile fields, [] = no profile.
    `splits` None = every event; e.g. ["train"] to keep later periods out of the text."""

    format: Literal["plain", "json", "markdown"] = "plain"
    max_events: int = 100
    max_chars: int = 12_000
    profile_fields: list[str] | None = None
    splits: list[str] | None = None

    def validate(self, where: str) -> None:
        if self.max_events < 1 or self.max_chars < 1:
            raise ConfigError(f"{where}: max_events ({self.max_events}) and max_chars ({self.max_chars}) "
                              "must be >= 1")
        bad = sorted(set(self.splits or ()) - set(SPLIT_NAMES))
        if bad:
            raise ConfigError(f"{where}.splits: {bad} are not splits ({', '.join(SPLIT_NAMES)})")


# -- readable values ----------------------------------------------------------------------------------
def fixed2(expr: pl.Expr) -> pl.Expr:
    """A number as text with exactly 2 decimals (`-3.5` -> `-3.50`), vectorised; null stays null."""
    cents = (expr.abs() * 100).round(0).cast(pl.Int64)
    sign = pl.when(expr < 0).then(pl.lit("-")).otherwise(pl.lit(""))
    return pl.concat_str([sign, (cents // 100).cast(pl.String), pl.lit("."),
                          (cents % 100).cast(pl.String).str.zfill(2)])


def _profile_value(col: str, dtype: pl.DataType) -> pl.Expr:
    """Integers (and whole floats such as age 24.0) without decimals, other floats with 2."""
    x = pl.col(col)
    if dtype.is_float():
        return pl.when(x == x.round(0)).then(x.cast(pl.Int64).cast(pl.String)).otherwise(fixed2(x))
    return x.cast(pl.String)


def _field_value(name: str, kind: str, descriptions: dict[str, dict[str, str]]) -> pl.Expr:
    x = pl.col(name)
    if kind == "numeric":
        return fixed2(x.cast(pl.Float64))
    x = x.cast(pl.String)
    if name in descriptions:
        x = x.replace(descriptions[name])
    return x


def event_value_exprs(fields: list[tuple[str, str]], descriptions: dict[str, dict[str, str]] | None = None
                      ) -> list[pl.Expr]:
    """One String expression per written value, named after it: `time`, then each (field, kind)."""
    descriptions = descriptions or {}
    time = pl.col(TIME).dt.strftime("%Y-%m-%d %H:%M %a").alias(TIME_NAME)
    values = [_field_value(n, k, descriptions).fill_null(MISSING).alias(n) for n, k in fields]
    return [time, *values]


def _escape_cell(expr: pl.Expr) -> pl.Expr:
    return expr.str.replace_all("|", "\\|", literal=True).str.replace_all("\n", " ", literal=True)


def line_expr(names: list[str], fmt: str) -> pl.Expr:
    """One event's line from the String columns `names` (as made by `event_value_exprs`)."""
    if fmt == "plain":
        parts: list[pl.Expr | str] = []
        for i, n in enumerate(names):
            parts += [pl.lit(f"{', ' if i else ''}{n}="), pl.col(n).str.replace_all("\n", " ", literal=True)]
        return pl.concat_str(parts)
    if fmt == "json":
        return pl.struct(names).struct.json_encode()
    if fmt == "markdown":
        cells = pl.concat_str([_escape_cell(pl.col(n)) for n in names], separator=" | ")
        return pl.concat_str([pl.lit("| "), cells, pl.lit(" |")])
    raise ConfigError(f"unknown text format {fmt!r}; choose one of {', '.join(TEXT_FORMATS)}")


def _table_head(names: list[str]) -> str:
    return "| " + " | ".join(names) + " |\n|" + "---|" * len(names)


# -- headers ------------------------------------------------------------------------------------------
def profile_headers(profile: pl.DataFrame | None, fields: list[str], fmt: str) -> pl.DataFrame:
    """user_idx -> the profile line (`age: 55, gender: M` or a JSON object); empty without fields."""
    if profile is None or not fields:
        return pl.DataFrame({USER_IDX: [], "_profile": []}, schema={USER_IDX: pl.UInt32, "_profile": pl.String})
    missing = [f for f in fields if f not in profile.columns]
    if missing:
        raise ConfigError(f"profile fields {missing} are not in the profile ({', '.join(profile.columns)})")
    values = profile.select(pl.col(USER_IDX).cast(pl.UInt32),
                            *[_profile_value(f, profile.schema[f]).fill_null(MISSING).alias(f) for f in fields])
    if fmt == "json":
        line = pl.struct(fields).struct.json_encode()
    else:
        parts: list[pl.Expr] = []
        for i, f in enumerate(fields):
            parts += [pl.lit(f"{', ' if i else ''}{f}: "), pl.col(f)]
        line = pl.concat_str(parts)
    return values.select(USER_IDX, line.alias("_profile"))


# -- the serialiser -----------------------------------------------------------------------------------
def _budget(lines: pl.DataFrame, head_len: pl.Expr, cfg: TextConfig) -> pl.DataFrame:
    """Keep the newest lines that fit `max_chars` with the header (the newest one always)."""
    used = (pl.col(_LINE).str.len_chars() + 1).cum_sum(reverse=True).over(USER_IDX) + head_len
    newest = pl.int_range(pl.len(), 0, -1).over(USER_IDX) == 1
    return lines.filter((used <= cfg.max_chars) | newest)


def serialise_frame(events: pl.DataFrame, fields: list[tuple[str, str]], profile: pl.DataFrame | None = None,
                    cfg: TextConfig | None = None, profile_fields: list[str] | None = None,
                    descriptions: dict[str, dict[str, str]] | None = None) -> pl.DataFrame:
    """The texts of the users in `events` (sorted by user then time, with `user_idx`, `user_id`, `timestamp`
    and one column per (field, kind) in `fields`). Returns user_idx, user_id, n_events, header, body, text
    sorted by user_idx; users without events are absent."""
    cfg = cfg or TextConfig()
    missing = [n for n, _ in fields if n not in events.columns]
    if missing:
        raise DataError(f"event fields {missing} are not in the events ({', '.join(events.columns)})")
    unknown = sorted(set(descriptions or {}) - {n for n, k in fields if k == "categorical"})
    if unknown:
        raise ConfigError(f"descriptions for {unknown}, which are not categorical event fields "
                          f"({', '.join(n for n, k in fields if k == 'categorical')})")
    names = [TIME_NAME, *[n for n, _ in fields]]
    events = events.filter(pl.int_range(pl.len(), 0, -1).over(USER_IDX) <= cfg.max_events)  # before formatting
    lines = events.select(pl.col(USER_IDX).cast(pl.UInt32), USER, *event_value_exprs(fields, descriptions)
                          ).select(USER_IDX, USER, line_expr(names, cfg.format).alias(_LINE))
    heads = profile_headers(profile, profile_fields or [], cfg.format)
    table = _table_head(names) if cfg.format == "markdown" else ""
    lines = lines.join(heads, on=USER_IDX, how="left", maintain_order="left")
    head = pl.col("_profile").fill_null("")
    if table:
        head = pl.when(head == "").then(pl.lit(table)).otherwise(head + "\n" + table)
    lines = _budget(lines.with_columns(head.alias("header")), pl.col("header").str.len_chars(), cfg)
    out = lines.group_by(USER_IDX, maintain_order=True).agg(
        pl.col(USER).first(), pl.len().cast(pl.Int64).alias("n_events"), pl.col("header").first(),
        pl.col(_LINE).str.join("\n").alias("body"))
    text = pl.concat_str([pl.when(pl.col("header") != "").then(pl.col("header")), pl.col("body")],
                         separator="\n", ignore_nulls=True)
    return out.with_columns(text.alias("text")).sort(USER_IDX)


def text_fields(cfg: DatasetConfig) -> list[tuple[str, str]]:
    """The (field, kind) pairs written per event: every field read from a column, in config order."""
    return [(f.name, f.kind) for f in cfg.column_fields]


def serialise_users(run_dir: RunDir | str | Path, cfg: TextConfig | None = None,
                    descriptions: dict[str, dict[str, str]] | None = None) -> pl.DataFrame:
    """The texts of every user of a prepared run (see `serialise_frame`); row i is user_idx i when every user
    has events in the chosen splits. `descriptions` defaults to `builtin_descriptions(dataset config)`."""
    cfg = cfg or TextConfig()
    run = RunDir.of(run_dir).require()
    dataset = run.config()
    fields = text_fields(dataset)
    events = run.scan_events()
    if cfg.splits is not None:
        events = events.filter(pl.col(SPLIT).is_in([SPLIT_NAMES.index(s) for s in cfg.splits]))
    events = events.select(USER_IDX, USER, TIME, *[n for n, _ in fields])
    profile = pl.read_parquet(run.profile) if run.profile.is_file() else None
    names = [f.name for f in dataset.profile.fields] if cfg.profile_fields is None else cfg.profile_fields
    if profile is None:
        names = []
    if descriptions is None:
        descriptions = builtin_descriptions(dataset)
    return serialise_frame(events.collect(), fields, profile, cfg, names, descriptions)


# -- descriptions -------------------------------------------------------------------------------------
def load_descriptions(path: str | Path) -> dict[str, str]:
    """A code -> description table: a CSV/TSV whose first two columns are the code and its text
    (a header row is kept as an ordinary entry only if its first cell is a code in the data)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"description table {path} does not exist")
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        dialect = "excel-tab" if path.suffix in (".tsv", ".tab") else "excel"
        rows = [r for r in csv.reader(fh, dialect) if len(r) >= 2]
    if not rows:
        raise DataError("no rows with two columns (code, description)", file=str(path))
    return {r[0].strip(): r[1].strip() for r in rows}


def movielens_titles(root: Path) -> dict[str, str]:
    """item_id -> `Title (year; genres)` from RecBole's `ml-100k.item` or `Title (year)` from `u.item`."""
    item = root / "ml-100k.item"
    if item.is_file():
        frame = pl.read_csv(item, separator="\t", quote_char=None, infer_schema=False)
        frame.columns = [c.split(":")[0] for c in frame.columns]
        text = pl.format("{} ({}; {})", pl.col("movie_title"), pl.col("release_year").fill_null("?"),
                         pl.col("class").fill_null("?"))
        return dict(zip(frame["item_id"].to_list(), frame.select(text).to_series().to_list()))
    item = root / "u.item"
    if item.is_file():
        rows = [r.split("|") for r in item.read_text(encoding="latin-1").splitlines() if r]
        return {r[0]: r[1] for r in rows if len(r) > 1}
    return {}


def builtin_descriptions(dataset: DatasetConfig) -> dict[str, dict[str, str]]:
    """Description tables that ship with a dataset: MovieLens-100k item -> title. None ship with the
    simulator, the handbook or TabFormer (no MCC description file in the data; pass one with
    `load_descriptions`)."""
    if dataset.source != "movielens100k":
        return {}
    from pantherseq.data.sources import recbole_ml100k

    root = Path(dataset.data) if dataset.data else recbole_ml100k()
    if root is None:
        return {}
    titles = movielens_titles(root if root.is_dir() else root.parent)
    item = next((f.name for f in dataset.column_fields if f.source in ("item_id", "item")), None)
    return {item: titles} if titles and item else {}
