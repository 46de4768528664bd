"""Item side tables (issue 16): a table of items joined to the events by id, whose columns become event fields.

    table = read_items(lf, path, cfg)          # ITEM + one canonical column per item field, one row per item
    events, stats = join_items(events, table, cfg)
    source_names(table, cfg)                   # the table with its file's column names (RUN/items.parquet)

`[items]` (schema.ItemsConfig) names the event field that holds the item id (`on`), the table's id column
(`key`) and the fields read from the table (`fields`, each from its `column`). The table is read and checked
as events are (tables.py: one error line naming file, row and column, or `bad_rows = "drop"`); an id the table
holds twice is bad input too (the first row is kept under "drop"). An event whose item is not in the table gets
missing item fields: their field UNK. Once joined, an item field is an event field like any other, so the
tokenizer, every model (field embeddings, field heads), the aggregates and CoLES see it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl

from pantherseq.data.schema import DatasetConfig
from pantherseq.data.tables import (
    FILE,
    ROW,
    Column,
    canonicalize,
    check_nonempty,
    field_column,
    require_columns,
    scan_text,
)
from pantherseq.errors import DataError

log = logging.getLogger(__name__)
ITEM = "_item"
TAB_SUFFIXES = (".tsv", ".item")


def item_columns(cfg: DatasetConfig) -> list[Column]:
    """The table's id column and its item fields, as `canonicalize` reads them."""
    fields = [cfg.field(n) for n in cfg.items.fields]
    return [Column(ITEM, cfg.items.key, "str", max_chars=cfg.max_value_chars),
            *[field_column(f, cfg.max_value_chars) for f in fields]]


def scan_items(path: Path, separator: str | None = None) -> pl.LazyFrame:
    """A generic item table file (CSV, TSV or Parquet) as text."""
    if not path.is_file():
        raise DataError(f"item table {path} does not exist (items.path)")
    return scan_text(path, separator=separator or ("\t" if path.name.endswith(TAB_SUFFIXES) else ","))


def _unique_ids(frame: pl.DataFrame, cfg: DatasetConfig) -> pl.DataFrame:
    dup = frame[ITEM].is_duplicated()
    if not dup.any():
        return frame
    if cfg.bad_rows == "error":
        first, second = frame.filter(dup).sort(ITEM, maintain_order=True).head(2).rows(named=True)
        raise DataError(f"duplicate item id (also at row {first[ROW]})", file=second[FILE], row=second[ROW],
                        column=cfg.items.key, value=second[ITEM])
    return frame.filter(frame[ITEM].is_first_distinct())


def read_items(lf: pl.LazyFrame, path: Path, cfg: DatasetConfig) -> pl.DataFrame:
    """The checked item table: ITEM (text) + one column per item field (canonical names and types)."""
    cols = item_columns(cfg)
    require_columns(lf, path, [c.source for c in cols])
    frame, _, _ = canonicalize(lf.select(FILE, ROW, *dict.fromkeys(c.source for c in cols)), cols, cfg.bad_rows,
                               [path])
    check_nonempty(frame, [path])
    return _unique_ids(frame, cfg).drop(FILE, ROW)


def empty_items(cfg: DatasetConfig) -> pl.DataFrame:
    """A table with no item (every event's item fields missing)."""
    kinds = {f.name: f.kind for f in cfg.fields}
    schema = {ITEM: pl.Utf8, **{n: pl.Float64 if kinds[n] == "numeric" else pl.Utf8 for n in cfg.items.fields}}
    return pl.DataFrame(schema=schema)


def join_items(events: pl.DataFrame, table: pl.DataFrame, cfg: DatasetConfig) -> tuple[pl.DataFrame, dict]:
    """The events with the item fields of their item (left join on `items.on`, event order kept) and what the
    join found: {items, events_unmatched} (events whose item id the table does not hold)."""
    on = cfg.items.on
    joined = events.join(table, left_on=on, right_on=ITEM, how="left", maintain_order="left")
    unmatched = int((events[on].is_not_null() & ~events[on].is_in(table[ITEM].implode())).sum())
    return joined, join_stats(table, cfg, unmatched)


def join_stats(table: pl.DataFrame, cfg: DatasetConfig, unmatched: int) -> dict:
    """prepare.json's `items` (either engine's join): {items, fields, events_unmatched}, warning when some
    events name an item the table does not hold."""
    if unmatched:
        log.warning("%d events name an item the item table does not hold: their item fields are UNK", unmatched)
    return {"items": table.height, "fields": list(cfg.items.fields), "events_unmatched": int(unmatched)}


def source_names(table: pl.DataFrame, cfg: DatasetConfig) -> pl.DataFrame:
    """The canonical table with the column names `[items]` reads (`key`, each field's `column`), so the run's
    copy (RUN/items.parquet) reads back as the original did."""
    names = {ITEM: cfg.items.key, **{n: cfg.field(n).source for n in cfg.items.fields}}
    return table.rename(names)


__all__ = ["ITEM", "empty_items", "item_columns", "join_items", "join_stats", "read_items", "scan_items",
           "source_names"]
