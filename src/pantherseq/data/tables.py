"""Tables of text -> canonical columns: finding the files, scanning them lazily, parsing and checking values.

Files are scanned lazily with Polars, every column read as text (CSV bytes that are not UTF-8 become U+FFFD
and are caught below), and parsed in one pass by `canonicalize`. A value that does not parse or is out of
bounds is bad input: with `bad_rows = "error"` (default) the first one raises a `DataError` naming the file,
row (1-based data row; the CSV line is row + 1) and column; with `bad_rows = "drop"` such rows are dropped
and counted by reason and column, e.g. `not_a_number:TX_AMOUNT`. The reasons:

    not_utf8           the value holds bytes that are not UTF-8 (read as U+FFFD)
    not_a_number       a numeric field that is not a finite number (or is below its `min_value`)
    too_long           a text value (user id, event id, categorical field) over `max_value_chars` characters
    unparsable_time    a timestamp that does not parse (`columns.time_format`)
    time_out_of_range  a timestamp outside the years `min_year` .. `max_year`
    bad_label          a label that is not one of LABEL_TRUE / LABEL_FALSE
    empty              a required value is missing

The source adapters (`sources.py`) say which columns to read and how (`Column`).
"""

from __future__ import annotations

import csv
import difflib
import glob
import gzip
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pantherseq.data.schema import EVENT_ID, LABEL, SCENARIO, TIME, USER, DatasetConfig, FieldConfig
from pantherseq.errors import DataError

FILE, ROW = "_file", "_row"
TABLE_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".parquet", ".pq")
LABEL_TRUE = ["1", "yes", "true", "y", "t"]
LABEL_FALSE = ["0", "no", "false", "n", "f"]
REPLACEMENT = "\ufffd"  # what a byte that is not UTF-8 reads as
DUPLICATED = "_duplicated_"  # Polars' suffix for a repeated header name


@dataclass
class Column:
    """How one canonical column is parsed from a source column."""

    name: str  # canonical name
    source: str  # column in the file
    kind: str  # "str" | "float" | "time" | "label" | "int"
    required: bool = True
    time_format: str | None = None
    min_value: float | None = None
    max_chars: int | None = None  # "str": a longer value is bad input
    years: tuple[int, int] | None = None  # "time": a year outside [first, last] is bad input


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
                         new_columns=names, quote_char='"', encoding="utf8-lossy")
    try:
        columns = lf.collect_schema().names()
    except (pl.exceptions.NoDataError, pl.exceptions.ComputeError, OSError) as exc:
        raise DataError(f"cannot read it as a table: {str(exc).splitlines()[0]}", file=str(path)) from None
    if not columns or columns == [""]:
        raise DataError("the file is empty (no header, no rows)", file=str(path))
    repeated = [c for c in columns if c.rsplit(DUPLICATED, 1)[0] in columns and DUPLICATED in c]
    if repeated:
        raise DataError("the header names this column more than once", file=str(path),
                        column=repeated[0].rsplit(DUPLICATED, 1)[0])
    return lf.with_row_index(ROW, offset=1).with_columns(pl.lit(str(path)).alias(FILE))


def require_columns(lf: pl.LazyFrame, path: Path, needed: list[str]) -> None:
    require_names([c for c in lf.collect_schema().names() if c not in (FILE, ROW)], needed, file=str(path))


def require_names(have: list[str], needed: list[str], **where: str) -> None:
    """DataError naming the first of `needed` not in `have` (and the closest name there), located by
    `where` (DataError's file= or table=)."""
    what = "table" if "table" in where else "file"
    for name in needed:
        if name not in have:
            close = difflib.get_close_matches(name, have, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DataError(f"missing column (the {what} has {have}){hint}", column=name, **where)


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


def _value(col: Column, raw: pl.Expr) -> tuple[pl.Expr, pl.Expr, str]:
    """(parsed value, bad-value mask, drop reason) of the column's kind."""
    if col.kind == "str":
        return raw, pl.lit(False), "bad_value"
    if col.kind in ("float", "int"):
        num = raw.str.strip_prefix("$").cast(pl.Float64, strict=False)
        bad = raw.is_not_null() & (num.is_null() | num.is_nan() | num.is_infinite())
        if col.min_value is not None:
            bad = bad | (num < col.min_value)
        return num, bad, "not_a_number"
    if col.kind == "time":
        if col.time_format == "epoch_s":
            secs = raw.cast(pl.Float64, strict=False)
            val = pl.from_epoch((secs * 1e6).cast(pl.Int64, strict=False), time_unit="us")
        elif col.time_format:
            val = raw.str.to_datetime(col.time_format, strict=False, time_unit="us")
        else:
            val = raw.str.to_datetime(strict=False, time_unit="us")
        return val, raw.is_not_null() & val.is_null(), "unparsable_time"
    if col.kind == "label":
        low = raw.str.to_lowercase()
        val = (pl.when(low.is_in(LABEL_TRUE)).then(1).when(low.is_in(LABEL_FALSE)).then(0)
               .otherwise(None).cast(pl.Int8))
        return val, raw.is_not_null() & val.is_null(), "bad_label"
    raise ValueError(col.kind)


def _parse(col: Column) -> tuple[pl.Expr, list[tuple[pl.Expr, str]]]:
    """(parsed value, [(bad-value mask, drop reason), ...] in the order they are reported) for one column."""
    raw = _clean(col.source)
    value, bad, reason = _value(col, raw)
    checks = [(pl.col(col.source).str.contains(REPLACEMENT, literal=True).fill_null(False), "not_utf8"),
              (bad, reason)]
    if col.max_chars is not None and col.kind == "str":
        checks.append((raw.str.len_chars() > col.max_chars, "too_long"))
    if col.years is not None and col.kind == "time":
        year = value.dt.year()
        checks.append((((year < col.years[0]) | (year > col.years[1])).fill_null(False), "time_out_of_range"))
    return value.alias(col.name), checks


def _first_bad(frame: pl.DataFrame, col: Column, reason: str) -> DataError:
    row = frame.filter(pl.col("_bad")).row(0, named=True)
    messages = {
        "not_a_number": "not a finite number" + (
            f" >= {col.min_value:g}" if col.min_value is not None else ""),
        "unparsable_time": f"cannot parse the time (format {col.time_format or 'ISO 8601'})",
        "bad_label": f"a label must be one of {LABEL_TRUE + LABEL_FALSE}",
        "empty": "the value is empty",
        "not_utf8": "the value is not UTF-8 text (re-encode the file as UTF-8, or set bad_rows = \"drop\")",
        "too_long": f"the value is longer than {col.max_chars} characters (the cap max_value_chars)",
        "time_out_of_range": f"the time is outside the years {'..'.join(map(str, col.years or ()))} "
                             "(min_year, max_year)",
    }
    return DataError(messages.get(reason, reason), file=row[FILE], row=row[ROW], column=col.source,
                     value=row["_raw"])


def _ragged_row(path: Path, separator: str) -> tuple[int, int, int] | None:
    """(row, fields, header fields) of the first CSV row whose field count differs from the header."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8", errors="replace") as fh:
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


class RankedError(Exception):
    """A DataError with its place in the order `canonicalize` checks (so per-file reads report alike)."""

    def __init__(self, error: DataError, check: int):
        super().__init__(str(error))
        self.error, self.check = error, check


def canonicalize(lf: pl.LazyFrame, columns: list[Column], bad_rows: str,
                 files: list[Path] | None = None) -> tuple[pl.DataFrame, int, dict]:
    """Parse text columns into canonical ones in one collect; handle bad values per `bad_rows`.

    Returns (frame with FILE, ROW and the canonical columns, rows read, dropped reason -> count).
    """
    try:
        return canonicalize_ranked(lf, columns, bad_rows, files)
    except RankedError as exc:
        raise exc.error from None


def canonicalize_ranked(lf: pl.LazyFrame, columns: list[Column], bad_rows: str,
                        files: list[Path] | None = None) -> tuple[pl.DataFrame, int, dict]:
    """`canonicalize`, raising RankedError: check -1 for a file that cannot be read, else the index of
    the first check (column by column, reason by reason) that found a bad value."""
    exprs, checks = [], []
    for col in columns:
        value, bads = _parse(col)
        exprs.append(value)
        checks.extend((col, bad.alias(f"_{reason}:{col.name}"), reason) for bad, reason in bads)
        if col.required:
            checks.append((col, _clean(col.source).is_null().alias(f"_empty:{col.name}"), "empty"))
    try:
        frame = lf.with_columns([bad for _, bad, _ in checks]).collect()
    except pl.exceptions.PolarsError as exc:
        raise RankedError(explain_read_error(exc, files or []), -1) from None
    rows_read = frame.height
    dropped: dict[str, int] = {}
    keep = pl.Series([True] * frame.height) if frame.height else pl.Series([], dtype=pl.Boolean)
    for k, (col, bad, reason) in enumerate(checks):
        mask = frame[bad.meta.output_name()]
        n = int(mask.sum())
        if not n:
            continue
        if bad_rows == "error":
            probe = frame.select(FILE, ROW, mask.alias("_bad"), pl.col(col.source).alias("_raw"))
            raise RankedError(_first_bad(probe, col, reason), k)
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
    cols = [Column(USER, c.user_id, "str", max_chars=cfg.max_value_chars),
            Column(TIME, timestamp or c.timestamp, "time", time_format=time_format or c.time_format,
                   years=(cfg.min_year, cfg.max_year))]
    for f in cfg.event_column_fields:
        cols.append(field_column(f, cfg.max_value_chars))
    if c.label:
        cols.append(Column(LABEL, c.label, "label", required=False))
    if c.scenario:
        cols.append(Column(SCENARIO, c.scenario, "int", required=False))
    if c.event_id:
        cols.append(Column(EVENT_ID, c.event_id, "str", max_chars=cfg.max_value_chars))
    return cols


def field_column(f: FieldConfig, max_chars: int | None = None) -> Column:
    return Column(f.name, f.source, "float" if f.kind == "numeric" else "str", required=f.required,
                  min_value=f.min_value, max_chars=max_chars)
