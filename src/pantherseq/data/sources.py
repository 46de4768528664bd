"""Source adapters: files on disk (or the simulator) -> the canonical event frame of `schema.py`.

`load_source(cfg)` dispatches on `cfg.source` through `SOURCES`:
- `csv`       generic CSV / Parquet (a file, a glob or a folder), driven by the config's columns and fields;
- `handbook`  Fraud Detection Handbook parts (the `csv` reader with the built-in column mapping);
- `tabformer` IBM TabFormer card_transaction format, joined with `sd254_users.csv` / `sd254_cards.csv`;
- `movielens100k` the copy inside the installed `recbole` wheel, or a folder with `u.data` / `u.user`;
- `simulated` the built-in simulator.

Files are scanned lazily with Polars, every column read as text, and parsed in one pass. A value that
does not parse is bad input: with `bad_rows = "error"` (default) the first one raises a `DataError`
naming the file, row (1-based data row; the CSV line is row + 1) and column; with `bad_rows = "drop"`
such rows are dropped and counted by reason, e.g. `not_a_number:TX_AMOUNT`.
"""

from __future__ import annotations

import csv
import difflib
import glob
import gzip
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import util as importlib_util
from pathlib import Path

import polars as pl

from pantherseq.data.schema import EVENT_ID, LABEL, SCENARIO, TIME, USER, DatasetConfig, FieldConfig
from pantherseq.errors import DataError

log = logging.getLogger(__name__)

FILE, ROW = "_file", "_row"
TABLE_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".parquet", ".pq")
LABEL_TRUE = ["1", "yes", "true", "y", "t"]
LABEL_FALSE = ["0", "no", "false", "n", "f"]


@dataclass
class Loaded:
    """What a source hands to `prepare`: canonical events (any order) and the optional profile."""

    events: pl.DataFrame
    profile: pl.DataFrame | None
    rows_read: int
    dropped: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


@dataclass
class Column:
    """How one canonical column is parsed from a source column."""

    name: str  # canonical name
    source: str  # column in the file
    kind: str  # "str" | "float" | "time" | "label" | "int"
    required: bool = True
    time_format: str | None = None
    min_value: float | None = None


# -- files -------------------------------------------------------------------------------------
def resolve_files(data: str | Path | None, what: str = "data") -> list[Path]:
    """A file, a glob or a folder -> the sorted list of table files. Raises if nothing matches."""
    if data is None:
        raise DataError(f"no {what} path given: pass --data PATH (a file, a glob or a folder)")
    text = str(data)
    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.endswith(TABLE_SUFFIXES))
    elif any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(text))
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{what} path {text} does not exist")
    if not files:
        raise DataError(f"{what} path {text} holds no {'/'.join(TABLE_SUFFIXES)} files")
    return files


def _is_parquet(path: Path, fmt: str) -> bool:
    return fmt == "parquet" or (fmt == "auto" and path.name.endswith((".parquet", ".pq")))


def scan_text(path: Path, fmt: str = "auto", separator: str | None = None,
              has_header: bool = True, names: list[str] | None = None) -> pl.LazyFrame:
    """Lazy scan of one file with every column as text, plus its file name and row index."""
    if _is_parquet(path, fmt):
        lf = pl.scan_parquet(path)
        lf = lf.select(pl.all().cast(pl.Utf8))
    else:
        sep = separator or ("\t" if path.name.endswith(".tsv") else ",")
        lf = pl.scan_csv(path, separator=sep, infer_schema=False, has_header=has_header,
                         new_columns=names, quote_char='"')
    try:
        columns = lf.collect_schema().names()
    except (pl.exceptions.NoDataError, pl.exceptions.ComputeError, OSError) as exc:
        raise DataError(f"cannot read it as a table: {str(exc).splitlines()[0]}", file=str(path)) from None
    if not columns or columns == [""]:
        raise DataError("the file is empty (no header, no rows)", file=str(path))
    return lf.with_row_index(ROW, offset=1).with_columns(pl.lit(str(path)).alias(FILE))


def require_columns(lf: pl.LazyFrame, path: Path, needed: list[str]) -> None:
    have = [c for c in lf.collect_schema().names() if c not in (FILE, ROW)]
    for name in needed:
        if name not in have:
            close = difflib.get_close_matches(name, have, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DataError(f"missing column (the file has {have}){hint}", file=str(path), column=name)


def scan_files(files: list[Path], needed: list[str], fmt: str = "auto", **kw) -> pl.LazyFrame:
    frames = []
    for path in files:
        lf = scan_text(path, fmt, **kw)
        require_columns(lf, path, needed)
        frames.append(lf.select([FILE, ROW, *needed]))
    return pl.concat(frames, how="vertical")


# -- parsing -----------------------------------------------------------------------------------
def _clean(src: str) -> pl.Expr:
    text = pl.col(src).str.strip_chars()
    return pl.when(text == "").then(None).otherwise(text)


def _parse(col: Column) -> tuple[pl.Expr, pl.Expr, str]:
    """(parsed value, bad-value mask, drop reason) for one column."""
    raw = _clean(col.source)
    if col.kind == "str":
        return raw.alias(col.name), pl.lit(False), "bad_value"
    if col.kind in ("float", "int"):
        num = raw.str.strip_prefix("$").cast(pl.Float64, strict=False)
        bad = raw.is_not_null() & (num.is_null() | num.is_nan() | num.is_infinite())
        if col.min_value is not None:
            bad = bad | (num < col.min_value)
        return num.alias(col.name), bad, "not_a_number"
    if col.kind == "time":
        if col.time_format == "epoch_s":
            secs = raw.cast(pl.Float64, strict=False)
            val = pl.from_epoch((secs * 1e6).cast(pl.Int64, strict=False), time_unit="us")
        elif col.time_format:
            val = raw.str.to_datetime(col.time_format, strict=False, time_unit="us")
        else:
            val = raw.str.to_datetime(strict=False, time_unit="us")
        return val.alias(col.name), raw.is_not_null() & val.is_null(), "unparsable_time"
    if col.kind == "label":
        low = raw.str.to_lowercase()
        val = (pl.when(low.is_in(LABEL_TRUE)).then(1).when(low.is_in(LABEL_FALSE)).then(0)
               .otherwise(None).cast(pl.Int8))
        return val.alias(col.name), raw.is_not_null() & val.is_null(), "bad_label"
    raise ValueError(col.kind)


def _first_bad(frame: pl.DataFrame, col: Column, reason: str) -> DataError:
    row = frame.filter(pl.col("_bad")).row(0, named=True)
    messages = {
        "not_a_number": "not a finite number" + (
            f" >= {col.min_value:g}" if col.min_value is not None else ""),
        "unparsable_time": f"cannot parse the time (format {col.time_format or 'ISO 8601'})",
        "bad_label": f"a label must be one of {LABEL_TRUE + LABEL_FALSE}",
        "empty": "the value is empty",
    }
    return DataError(messages.get(reason, reason), file=row[FILE], row=row[ROW], column=col.source,
                     value=row["_raw"])


def _ragged_row(path: Path, separator: str) -> tuple[int, int, int] | None:
    """(row, fields, header fields) of the first CSV row whose field count differs from the header."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="") as fh:
        reader = csv.reader(fh, delimiter=separator)
        header = next(reader, [])
        for row, values in enumerate(reader, start=1):
            if values and len(values) != len(header):
                return row, len(values), len(header)
    return None


def explain_read_error(exc: Exception, files: list[Path], separator: str = ",") -> DataError:
    """Turn a Polars parse failure into a DataError that names the file (and row when it can)."""
    for path in files:
        if _is_parquet(path, "auto"):
            continue
        found = _ragged_row(path, "\t" if path.name.endswith(".tsv") else separator)
        if found:
            row, n, m = found
            return DataError(f"the row has {n} fields but the header has {m}", file=str(path), row=row)
    where = str(files[0]) if len(files) == 1 else f"one of {len(files)} files"
    return DataError(f"cannot read {where}: {str(exc).splitlines()[0]}")


def canonicalize(lf: pl.LazyFrame, columns: list[Column], bad_rows: str,
                 files: list[Path] | None = None) -> tuple[pl.DataFrame, int, dict]:
    """Parse text columns into canonical ones in one collect; handle bad values per `bad_rows`.

    Returns (frame with FILE, ROW and the canonical columns, rows read, dropped reason -> count).
    """
    exprs, checks = [], []
    for col in columns:
        value, bad, reason = _parse(col)
        exprs.append(value)
        checks.append((col, bad.alias(f"_bad:{col.name}"), reason))
        if col.required:
            checks.append((col, _clean(col.source).is_null().alias(f"_empty:{col.name}"), "empty"))
    try:
        frame = lf.with_columns([bad for _, bad, _ in checks]).collect()
    except pl.exceptions.PolarsError as exc:
        raise explain_read_error(exc, files or []) from None
    rows_read = frame.height
    dropped: dict[str, int] = {}
    keep = pl.Series([True] * frame.height) if frame.height else pl.Series([], dtype=pl.Boolean)
    for col, bad, reason in checks:
        mask = frame[bad.meta.output_name()]
        n = int(mask.sum())
        if not n:
            continue
        if bad_rows == "error":
            probe = frame.select(FILE, ROW, mask.alias("_bad"), pl.col(col.source).alias("_raw"))
            raise _first_bad(probe, col, reason)
        newly = int((mask & keep).sum())
        if newly:
            dropped[f"{reason}:{col.source}"] = newly
        keep = keep & ~mask
    out = frame.filter(keep).select(FILE, ROW, *exprs) if dropped else frame.select(FILE, ROW, *exprs)
    return out, rows_read, dropped


def check_nonempty(frame: pl.DataFrame, files: list[Path]) -> None:
    seen = set(frame[FILE].unique().to_list()) if frame.height else set()
    for path in files:
        if str(path) not in seen:
            raise DataError("the file has a header but no data rows", file=str(path))


def event_columns(cfg: DatasetConfig, timestamp: str | None = None, time_format: str | None = None
                  ) -> list[Column]:
    """The canonical columns a config asks for, from its `columns` table and its column fields."""
    c = cfg.columns
    cols = [Column(USER, c.user_id, "str"),
            Column(TIME, timestamp or c.timestamp, "time", time_format=time_format or c.time_format)]
    for f in cfg.column_fields:
        cols.append(_field_column(f))
    if c.label:
        cols.append(Column(LABEL, c.label, "label", required=False))
    if c.scenario:
        cols.append(Column(SCENARIO, c.scenario, "int", required=False))
    if c.event_id:
        cols.append(Column(EVENT_ID, c.event_id, "str"))
    return cols


def _field_column(f: FieldConfig) -> Column:
    return Column(f.name, f.source, "float" if f.kind == "numeric" else "str", required=f.required,
                  min_value=f.min_value)


def _finish(frame: pl.DataFrame) -> pl.DataFrame:
    if SCENARIO in frame.columns:
        frame = frame.with_columns(pl.col(SCENARIO).fill_null(0).cast(pl.Int16))
    return frame


# -- adapters ----------------------------------------------------------------------------------
def load_profile_table(path: Path, key: str, fields: list[FieldConfig], bad_rows: str,
                       fmt: str = "auto", separator: str | None = None) -> pl.DataFrame:
    lf = scan_files([path], [key, *[f.source for f in fields]], fmt, separator=separator)
    cols = [Column(USER, key, "str")] + [_field_column(f) for f in fields]
    frame, _, _ = canonicalize(lf, cols, bad_rows, [path])
    return frame.drop(FILE, ROW).unique(USER, keep="first", maintain_order=True)


def read_csv_source(cfg: DatasetConfig) -> Loaded:
    files = resolve_files(cfg.data)
    cols = event_columns(cfg)
    lf = scan_files(files, [c.source for c in cols], cfg.format)
    frame, rows_read, dropped = canonicalize(lf, cols, cfg.bad_rows, files)
    check_nonempty(frame, files)
    profile = None
    if cfg.profile.path:
        profile = load_profile_table(Path(cfg.profile.path), cfg.profile.key, cfg.profile.fields,
                                     cfg.bad_rows, cfg.format)
    return Loaded(_finish(frame), profile, rows_read, dropped, [str(f) for f in files])


TABFORMER_TIME = "Year-Month-Day Time"


def _tabformer_paths(data: str | None) -> tuple[list[Path], Path | None, Path | None]:
    if data is None:
        raise DataError("no data path given: pass --data with the TabFormer folder or transactions file")
    root = Path(data)
    folder = root if root.is_dir() else root.parent
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.name.endswith(TABLE_SUFFIXES)
                       and "transaction" in p.name.lower())
        if not files:
            raise DataError(f"data path {root} holds no *transaction*.csv file")
    else:
        files = resolve_files(data)
    users, cards = folder / "sd254_users.csv", folder / "sd254_cards.csv"
    return files, (users if users.is_file() else None), (cards if cards.is_file() else None)


def _tabformer_profile(users: Path, cards: Path | None, cfg: DatasetConfig) -> pl.DataFrame:
    """Users table (row i = user i) + each user's card summary (count, main brand/type)."""
    lf = scan_text(users).with_columns((pl.col(ROW) - 1).cast(pl.Utf8).alias("User"))
    if cards is not None:
        card = scan_text(cards).group_by("User").agg(
            pl.len().cast(pl.Utf8).alias("Cards"),
            pl.col("Card Brand").sort_by("CARD INDEX").first(),
            pl.col("Card Type").sort_by("CARD INDEX").first(),
        )
        lf = lf.join(card, on="User", how="left")
    fields = [f for f in cfg.profile.fields if cards is not None or f.source not in
              ("Cards", "Card Brand", "Card Type")]
    require_columns(lf, users, [f.source for f in fields])
    cols = [Column(USER, "User", "str")] + [_field_column(f) for f in fields]
    frame, _, _ = canonicalize(lf, cols, cfg.bad_rows)
    return frame.drop(FILE, ROW)


def read_tabformer(cfg: DatasetConfig) -> Loaded:
    files, users, cards = _tabformer_paths(cfg.data)
    parts = ["Year", "Month", "Day", "Time"]
    cols = event_columns(cfg, timestamp=TABFORMER_TIME, time_format="%Y-%m-%d %H:%M")
    needed = [c.source for c in cols if c.source != TABFORMER_TIME] + parts
    lf = scan_files(files, list(dict.fromkeys(needed)), cfg.format)
    stamp = pl.concat_str([pl.col("Year"), pl.lit("-"), pl.col("Month"), pl.lit("-"), pl.col("Day"),
                           pl.lit(" "), pl.col("Time")]).alias(TABFORMER_TIME)
    lf = lf.with_columns(stamp)
    if "Errors?" in needed:  # empty means "no error": a value of its own, not a missing one
        lf = lf.with_columns(pl.col("Errors?").fill_null("none"))
    frame, rows_read, dropped = canonicalize(lf, cols, cfg.bad_rows, files)
    check_nonempty(frame, files)
    profile = _tabformer_profile(users, cards, cfg) if users is not None else None
    if users is None:
        log.warning("no sd254_users.csv beside %s: no profile", files[0])
    return Loaded(_finish(frame), profile, rows_read, dropped, [str(f) for f in files])


ML_INTER = ["user_id", "item_id", "rating", "timestamp"]
ML_USER = ["user_id", "age", "gender", "occupation", "zip_code"]


def recbole_ml100k() -> Path | None:
    spec = importlib_util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"
    return path if path.is_dir() else None


def _movielens_frames(root: Path) -> tuple[pl.LazyFrame, Path, pl.LazyFrame | None, Path | None]:
    if (root / "u.data").is_file():
        inter = root / "u.data"
        lf = scan_text(inter, separator="\t", has_header=False, names=ML_INTER)
        user = root / "u.user"
        ulf = scan_text(user, separator="|", has_header=False, names=ML_USER) if user.is_file() else None
        return lf, inter, ulf, (user if ulf is not None else None)
    inter = root / "ml-100k.inter"
    if not inter.is_file():
        raise DataError(f"{root} holds neither u.data nor ml-100k.inter")
    lf = scan_text(inter, separator="\t")
    lf = lf.rename({c: c.split(":")[0] for c in lf.collect_schema().names() if ":" in c})
    user = root / "ml-100k.user"
    ulf = None
    if user.is_file():
        ulf = scan_text(user, separator="\t")
        ulf = ulf.rename({c: c.split(":")[0] for c in ulf.collect_schema().names() if ":" in c})
    return lf, inter, ulf, (user if ulf is not None else None)


def read_movielens(cfg: DatasetConfig) -> Loaded:
    root = Path(cfg.data) if cfg.data else recbole_ml100k()
    if root is None:
        raise DataError("MovieLens-100k not found: install it with `pip install --no-deps recbole==1.2.1` "
                        "or pass --data with a folder holding u.data / u.user")
    if not root.is_dir():
        raise DataError(f"MovieLens path {root} is not a folder")
    lf, inter, ulf, user = _movielens_frames(root)
    cols = event_columns(cfg)
    require_columns(lf, inter, [c.source for c in cols])
    frame, rows_read, dropped = canonicalize(lf.select(FILE, ROW, *[c.source for c in cols]), cols,
                                             cfg.bad_rows, [inter])
    check_nonempty(frame, [inter])
    profile = None
    if ulf is not None:
        fields = cfg.profile.fields
        require_columns(ulf, user, [f.source for f in fields])
        pcols = [Column(USER, "user_id", "str")] + [_field_column(f) for f in fields]
        profile = canonicalize(ulf, pcols, cfg.bad_rows)[0].drop(FILE, ROW)
    return Loaded(_finish(frame), profile, rows_read, dropped, [str(inter)])


def read_simulated(cfg: DatasetConfig) -> Loaded:
    from pantherseq.data.simulate import simulate

    sim = simulate(cfg.simulate)
    events = sim.events.with_columns(pl.lit("simulator").alias(FILE),
                                     pl.int_range(1, sim.events.height + 1, dtype=pl.UInt32).alias(ROW))
    wanted = [USER, TIME, *[f.name for f in cfg.column_fields], LABEL, SCENARIO, EVENT_ID]
    missing = [c for c in wanted if c not in events.columns]
    if missing:
        raise DataError(f"the simulator has no column(s) {missing}; it has {events.columns}")
    profile_cols = [USER, *[f.name for f in cfg.profile.fields]]
    if "persona" in sim.profile.columns and "persona" not in profile_cols:
        profile_cols.append("persona")  # a user-level label for probes, never a model input by default
    return Loaded(events.select(FILE, ROW, *wanted), sim.profile.select(profile_cols), events.height,
                  {}, ["simulator"])


SOURCES: dict[str, Callable[[DatasetConfig], Loaded]] = {
    "csv": read_csv_source,
    "handbook": read_csv_source,
    "tabformer": read_tabformer,
    "movielens100k": read_movielens,
    "simulated": read_simulated,
}


def load_source(cfg: DatasetConfig) -> Loaded:
    try:
        reader = SOURCES[cfg.source]
    except KeyError:
        raise DataError(f"unknown source {cfg.source!r}; choose one of {', '.join(SOURCES)}") from None
    return reader(cfg)
