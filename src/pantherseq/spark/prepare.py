"""`prepare --engine spark`: the Polars `prepare` (prepare.py) as Spark jobs, writing the same run directory.

Where the work happens:
1. read       one Spark task per file runs the csv source's own per-file reader (sources.read_csv_file:
              parsing, bad-input checks, one-line errors) and stages canonical Parquet; the driver merges
              the per-file counts and raises the error a one-process read would raise first;
2. order      duplicate event ids, too-short users, gap_s and the split with Spark windows over
              (user_id, time, file, row) -- the stable order of the Polars path;
3. fit        bucket edges from order statistics and categorical vocabularies from value counts (Spark
              aggregations; the driver applies encoders.quantiles / fit_counts), then field codes in the
              executors (mapInArrow, the tokenizer's own vectorised encoders), the top-K vocabulary from the
              training key counts (StructuredTokenizer.fit_vocab) -- or, with `--tokenizer-from RUN`, RUN's
              fitted tokenizer as it is (nothing fitted; tokenizer.json copied byte for byte);
4. write      tokens by a broadcast join on the key; each shard's sequences by one executor
              (applyInArrow, data/sequences.py's format); events.parquet from globally sorted parts
              streamed by the driver into one file; users.parquet from the per-user aggregate.
`[items]`: the driver reads the item table with the Polars path's reader (its checks and errors) and Spark
left-joins it, broadcast, on `items.on`; `[users]`: the executors rank the distinct user ids by the seeded hash of
data/split.py `chosen_users` (the Polars path's rule) and keep the chosen users' events by a semi-join.
Only the csv and handbook sources run on Spark: CSV / Parquet paths, or a table of the Spark catalog (`table`:
Hive, Unity, any catalog the session is configured with), whose partitions are read as files are (columns cast
to text by Spark, then the same reader: the same checks, errors naming the table, its partition and the row in
it; ties in time keep the table's scan order).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import datetime
from functools import reduce
from pathlib import Path

import numpy as np
import polars as pl

from pantherseq.config import save_toml
from pantherseq.data.items import ITEM, join_stats
from pantherseq.data.schema import EVENT_ID, GAP, LABEL, N_SPECIAL, SCENARIO, TIME, UNK, USER, DatasetConfig
from pantherseq.data.sequences import Sequences, shard_folder, write_shards_meta
from pantherseq.data.sources import (
    FILE,
    ROW,
    FilePart,
    item_table,
    load_profile_table,
    merge_parts,
    read_csv_file,
    read_table_part,
)
from pantherseq.data.split import SPLIT, TEST, TRAIN, VALID, kept_ranks, user_rank_key
from pantherseq.data.tables import event_columns, require_names, resolve_files
from pantherseq.encoders import BucketEncoder, CategoricalEncoder, LogGapEncoder
from pantherseq.errors import ConfigError, DataError
from pantherseq.prepare import (
    TOKEN,
    USER_IDX,
    Facts,
    check_split,
    clear_sequences,
    label_counts,
    save_tokenizer,
    write_items,
)
from pantherseq.run import RunDir
from pantherseq.spark.session import build_session
from pantherseq.tokenizer import StructuredTokenizer

log = logging.getLogger(__name__)
SOURCES = ("csv", "handbook")
FILE_IDX, TIME_US, KEY, SHARD = "_file_idx", "_time_us", "_key", "_shard"
STAGE = "_spark"  # scratch folder inside the run directory, removed at the end
EVENT_BATCH_ROWS = 100_000  # events.parquet: rows the driver holds at a time
EPOCH = datetime(1970, 1, 1)


def _code(j: int) -> str:
    return f"_code{j}"


# -- 1. read -----------------------------------------------------------------------------------
_STATUS = (("index", "long"), ("rows_read", "long"), ("dropped", "string"), ("error", "string"), ("stage", "long"),
           ("check", "long"))  # what each read task reports to the driver (a FilePart without its events)
_STATUS_DDL = ", ".join(f"{name} {kind}" for name, kind in _STATUS)


def _staged(part: FilePart, out: str):
    """Write a read part's events as Parquet (time as epoch µs, the file index beside the row), and return
    its status row (an Arrow record batch of `_STATUS`)."""
    import pyarrow as pa

    if part.events is not None and part.events.height:
        frame = part.events.select(
            [pl.col(TIME).dt.epoch("us").alias(TIME_US) if c == TIME else pl.col(c)
             for c in part.events.columns if c != FILE]).with_columns(pl.lit(part.index, pl.Int32).alias(FILE_IDX))
        frame.write_parquet(f"{out}/part-{part.index:05d}.parquet")
    schema = pa.schema([(n, pa.int64() if t == "long" else pa.string()) for n, t in _STATUS])
    return pa.RecordBatch.from_pylist([{
        "index": part.index, "rows_read": part.rows_read, "dropped": json.dumps(part.dropped),
        "error": part.error, "stage": part.rank[0], "check": part.rank[1]}], schema=schema)


def _read_files(cfg: DatasetConfig, files: list[str], out: str):
    """mapInArrow body: each input row (index, path) is one file, read and staged as Parquet."""
    def run(batches):
        for batch in batches:
            for index in batch.column("index").to_pylist():
                yield _staged(read_csv_file(cfg, Path(files[index]), index), out)
    return run


def _read_partitions(cfg: DatasetConfig, names: list[str], columns: list[str], time_format: str | None, out: str):
    """mapInArrow body for a catalog table: each Spark partition (its columns as text) read as a file is."""
    import pyarrow as pa
    from pyspark import TaskContext

    schema = pa.schema([(c, pa.string()) for c in columns])

    def run(batches):
        index = TaskContext.get().partitionId()
        got = list(batches)
        frame = pl.from_arrow(pa.Table.from_batches(got) if got else schema.empty_table())
        yield _staged(read_table_part(cfg, frame, names[index], index, time_format), out)
    return run


def _parts(got: list) -> tuple[int, dict[str, int]]:
    """The read tasks' status rows -> (rows read, dropped counts), raising the first error in read order."""
    return merge_parts([FilePart(r["index"], None, r["rows_read"], json.loads(r["dropped"]), r["error"],
                                 (r["stage"], r["check"], r["index"])) for r in sorted(got, key=lambda r: r["index"])])


def _read(spark, cfg: DatasetConfig, files: list[Path], stage: Path) -> tuple[int, dict[str, int]]:
    names = [str(f) for f in files]
    out = stage / "canonical"
    out.mkdir(parents=True)
    rows = spark.sparkContext.parallelize([(i,) for i in range(len(files))], len(files))
    return _parts(spark.createDataFrame(rows, "index long").mapInArrow(_read_files(cfg, names, str(out)), _STATUS_DDL)
                  .collect())


_SPARK_TIME = "yyyy-MM-dd HH:mm:ss.SSSSSS"  # how a timestamp column is written as text for the reader
_POLARS_TIME = "%Y-%m-%d %H:%M:%S%.f"  # ... and read back


def _read_table(spark, cfg: DatasetConfig, stage: Path) -> tuple[int, dict[str, int], list[str]]:
    """`table`: the catalog table's columns the config reads, cast to text by Spark (a timestamp or date
    column with a fixed format, so `time_format` is for text columns only), each partition read and checked
    by the same reader as a file (`read_table_part`). Returns (rows read, dropped, a name per partition)."""
    from pyspark.errors import AnalysisException
    from pyspark.sql import functions as F
    from pyspark.sql.types import DateType, TimestampNTZType, TimestampType

    name = cfg.table
    try:
        df = spark.table(name)
    except AnalysisException as exc:
        raise DataError(f"not found in the Spark catalog ({str(exc).splitlines()[0][:160]})", table=name) from None
    columns = list(dict.fromkeys(c.source for c in event_columns(cfg)))
    require_names(df.columns, columns, table=name)
    types = {f.name: f.dataType for f in df.schema.fields}
    time_col = cfg.columns.timestamp
    is_time = isinstance(types[time_col], (TimestampType, TimestampNTZType, DateType))
    text = df.select([(F.date_format(F.col(f"`{c}`"), _SPARK_TIME) if c == time_col and is_time
                       else F.col(f"`{c}`").cast("string")).alias(c) for c in columns])
    parts = text.rdd.getNumPartitions()
    names = [f"{name} (Spark partition {i} of {parts})" for i in range(parts)]
    out = stage / "canonical"
    out.mkdir(parents=True)
    fmt = _POLARS_TIME if is_time else None
    rows_read, dropped = _parts(text.mapInArrow(_read_partitions(cfg, names, columns, fmt, str(out)), _STATUS_DDL)
                                .collect())
    if not any(out.glob("part-*.parquet")):
        raise DataError("the table has no rows" + (f" left after dropping {dropped}" if dropped else ""),
                        table=name)
    return rows_read, dropped, names


def _join_items(spark, cfg: DatasetConfig, ev):
    """(events with the item fields, the item table, join_items' stats): `[items]` as the Polars path joins it
    (left join on `items.on`; events whose item the table does not hold get missing item fields)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import DoubleType, StringType, StructField, StructType

    if not cfg.items.fields:
        return ev, None, {}
    table = item_table(cfg)  # small: read and checked on the driver, as the Polars path does
    kinds = {pl.Utf8: StringType(), pl.Float64: DoubleType()}
    right = F.broadcast(spark.createDataFrame(
        table.rows(), StructType([StructField(c, kinds[t]) for c, t in table.schema.items()])))
    on = cfg.items.on
    unmatched = ev.where(F.col(on).isNotNull()).join(right, ev[on] == right[ITEM], "left_anti").count()
    joined = ev.join(right, ev[on] == right[ITEM], "left").drop(ITEM)
    return joined, table, join_stats(table, cfg, unmatched)


# -- 2. order ----------------------------------------------------------------------------------
def _drop_duplicate_ids(ev, cfg: DatasetConfig, files: list[str], dropped: dict[str, int], what: str = "file"):
    """Keep the first event of each event id in (file, row) order; `files` names each file index, a `what`
    ("file", or "table" for a catalog table's partitions) in the errors."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if EVENT_ID not in ev.columns:
        return ev
    w = Window.partitionBy(EVENT_ID)
    ev = ev.withColumn("_n", F.count("*").over(w)).withColumn(
        "_k", F.row_number().over(w.orderBy(FILE_IDX, ROW)))
    n_dup = ev.where("_k > 1").count()
    if n_dup and cfg.bad_rows == "error":
        first, second = ev.where("_n > 1").orderBy(EVENT_ID, FILE_IDX, ROW).limit(2).collect()
        raise DataError(f"duplicate event id (also at {what} {files[first[FILE_IDX]]}, row {first[ROW]})",
                        row=second[ROW], column=EVENT_ID, value=second[EVENT_ID], **{what: files[second[FILE_IDX]]})
    if n_dup:
        dropped["duplicate_event_id"] = n_dup
    return ev.where("_k = 1").drop("_n", "_k")


def _order(ev, cfg: DatasetConfig, dropped: dict[str, int]):
    """Too-short users dropped; gap_s and split from the stable order (user, time, file, row)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    by_user = Window.partitionBy(USER)
    if cfg.split.min_events > 1:
        ev = ev.withColumn("_n", F.count("*").over(by_user))
        short = ev.where(F.col("_n") < cfg.split.min_events).count()
        if short:
            dropped["user_too_short"] = short
        ev = ev.where(F.col("_n") >= cfg.split.min_events).drop("_n")
    ordered = by_user.orderBy(TIME_US, FILE_IDX, ROW)
    ev = ev.withColumn(GAP, (F.col(TIME_US) - F.lag(TIME_US).over(ordered)) / F.lit(1e6))
    if cfg.split.kind == "time":
        t1, t2 = ((t - EPOCH) // _US for t in cfg.split.bounds())
        split = (F.when(F.col(TIME_US) < t1, TRAIN).when(F.col(TIME_US) < t2, VALID).otherwise(TEST))
    else:
        from_end = F.row_number().over(by_user.orderBy(F.desc(TIME_US), F.desc(FILE_IDX), F.desc(ROW)))
        split = F.when(from_end == 1, TEST).when(from_end == 2, VALID).otherwise(TRAIN)
    return ev.withColumn(SPLIT, split.cast("byte"))


def _select_users(spark, ev, cfg: DatasetConfig, dropped: dict[str, int]):
    """`[users]`: keep the users data/split.py `chosen_users` keeps of the users left (the rest counted
    `user_not_chosen`), ranked in the executors: every distinct user id keyed by `user_rank_key`, sorted and
    numbered by Spark (`zipWithIndex`), those at `kept_ranks` kept. The driver holds no user id."""
    if cfg.users.all:
        return ev
    from pyspark import StorageLevel

    seed = cfg.users.seed
    # kept: counted, then filtered, then read by every later job through the semi-join (else re-sorted each time)
    ranked = (ev.select(USER).distinct().rdd.map(lambda r: user_rank_key(seed, r[0])).sortBy(lambda k: k)
              .zipWithIndex().persist(StorageLevel.MEMORY_AND_DISK))
    keep = kept_ranks(ranked.count(), cfg.users)
    chosen = ranked.filter(lambda x: x[1] in keep).map(lambda x: (x[0][1],))
    out = ev.join(spark.createDataFrame(chosen, f"{USER} string"), USER, "left_semi")
    dropped["user_not_chosen"] = ev.count() - out.count()
    return out


_US = datetime(1970, 1, 1, 0, 0, 0, 1) - EPOCH  # one microsecond


# -- 3. fit ------------------------------------------------------------------------------------
def _order_stats(df, col: str):
    """(n, value_at) of a numeric column's finite values: a value histogram with cumulative counts."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    finite = df.where(F.col(col).isNotNull() & ~F.isnan(col) & (F.abs(col) < float("inf")))
    hist = finite.groupBy(col).count()
    hist = hist.withColumn("_end", F.sum("count").over(Window.orderBy(col))).cache()
    n = int(hist.agg(F.sum("count")).first()[0] or 0)

    def value_at(ranks: np.ndarray) -> np.ndarray:
        start = F.col("_end") - F.col("count")
        hit = reduce(lambda a, b: a | b, [(start <= int(r)) & (F.col("_end") > int(r)) for r in ranks])
        rows = sorted((r["_end"], r[col]) for r in hist.where(hit).select(col, "_end").collect())
        ends = np.asarray([e for e, _ in rows])
        return np.asarray([rows[int(np.searchsorted(ends, r, side="right"))][1] for r in ranks])
    return n, value_at


def _fit_encoders(tok: StructuredTokenizer, train) -> None:
    from pyspark.sql import functions as F

    for enc in tok.encoders:
        name = enc.cfg.name
        if isinstance(enc, CategoricalEncoder):
            counts = train.where(F.col(name).isNotNull()).groupBy(name).count().collect()
            enc.fit_counts([r[name] for r in counts], [r["count"] for r in counts])
        elif isinstance(enc, BucketEncoder):  # LogGapEncoder reads gap_s
            enc.fit_order_stats(*_order_stats(train, GAP if isinstance(enc, LogGapEncoder) else name))
    tok.encoders_fitted()


def _codes(tok: StructuredTokenizer):
    """mapInArrow body: append each field's code and the token key (the tokenizer's own encoders)."""
    import pyarrow as pa

    def run(batches):
        for batch in batches:
            frame = pl.from_arrow(pa.Table.from_batches([batch])).with_columns(
                pl.from_epoch(TIME_US, time_unit="us").alias(TIME))
            codes = tok.field_codes(frame)
            extra = [pa.array(codes[:, j]) for j in range(codes.shape[1])]
            yield pa.RecordBatch.from_arrays([*batch.columns, *extra, pa.array(tok.keys_of(codes))],
                                             names=[*batch.schema.names, *map(_code, range(codes.shape[1])), KEY])
    return run


def _fit(spark, cfg: DatasetConfig, ev, reused: StructuredTokenizer | None = None):
    """The tokenizer (fitted on the training events, or `reused` as it is) and the events with their codes."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import IntegerType, LongType, StructField, StructType

    tok = reused
    if tok is None:
        tok = StructuredTokenizer.from_config(cfg)
        _fit_encoders(tok, ev.where(F.col(SPLIT) == TRAIN))
    fields = [StructField(_code(j), IntegerType()) for j in range(len(tok.encoders))]
    schema = StructType([*ev.schema.fields, *fields, StructField(KEY, LongType())])
    coded = ev.mapInArrow(_codes(tok), schema)
    return tok, coded


def _tokens(spark, tok: StructuredTokenizer, coded, fit: bool = True):
    """The events with their token: the vocabulary fitted on the training key counts (`fit`), or the
    tokenizer's own."""
    from pyspark.sql import functions as F

    if fit:
        counts = coded.where(F.col(SPLIT) == TRAIN).groupBy(KEY).count().toArrow()
        tok.fit_vocab(counts.column(KEY).to_numpy(), counts.column("count").to_numpy())
    vocab = spark.createDataFrame([(int(k), i + N_SPECIAL) for i, k in enumerate(tok.keys.tolist())],
                                  f"{KEY} long, {TOKEN} int")
    return coded.join(F.broadcast(vocab), KEY, "left").withColumn(
        TOKEN, F.coalesce(F.col(TOKEN), F.lit(UNK)).cast("int"))


# -- 4. write ----------------------------------------------------------------------------------
def _users(spark, final) -> pl.DataFrame:
    """users.parquet (user_idx in user_id order, as the Polars path) plus each user's UNK flag."""
    from pyspark.sql import functions as F

    agg = final.groupBy(USER).agg(F.count("*").alias("events"), F.min(TIME_US).alias("first"),
                                  F.max(TIME_US).alias("last"), F.max((F.col(TOKEN) == UNK).cast("int")).alias("_unk"))
    users = pl.from_arrow(agg.toArrow()).sort(USER).with_row_index(USER_IDX)
    return users.with_columns(pl.col("events").cast(pl.UInt32),
                              *[pl.from_epoch(c, time_unit="us").alias(c) for c in ("first", "last")])


def _shard_writer(folder: str, shards: int, n_fields: int, field_names: list[str], columns: list[str]):
    """applyInArrow body: one shard's events -> data/sequences.py's arrays in its folder."""
    import pyarrow as pa

    def run(table):
        frame = pl.from_arrow(table).sort(USER_IDX, TIME_US, FILE_IDX, ROW)
        shard = int(frame[SHARD][0])
        users, counts = np.unique(frame[USER_IDX].to_numpy().astype(np.int64), return_counts=True)
        n = frame.height
        seq = Sequences(
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            tokens=frame[TOKEN].to_numpy().astype(np.int32),
            codes=np.stack([frame[_code(j)].to_numpy() for j in range(n_fields)], axis=1).astype(np.int32)
            .reshape(n, n_fields),
            time=frame[TIME_US].to_numpy() // 1_000_000,
            gap=frame[GAP].fill_null(float("nan")).to_numpy().astype(np.float32),
            label=(frame[LABEL].fill_null(-1).cast(pl.Int8).to_numpy() if LABEL in columns
                   else np.full(n, -1, np.int8)),
            scenario=(frame[SCENARIO].cast(pl.Int16).to_numpy() if SCENARIO in columns
                      else np.zeros(n, np.int16)),
            split=frame[SPLIT].to_numpy().astype(np.int8),
            field_names=field_names, users=users if shards > 1 else None)
        seq.save(shard_folder(folder, shard, shards))
        return pa.table({"shard": [shard], "users": [seq.n_users], "events": [seq.n_events]})
    return run


def _write_sequences(run: RunDir, cfg: DatasetConfig, tok: StructuredTokenizer, final) -> None:
    shards = cfg.sequences.shards
    clear_sequences(run)
    writer = _shard_writer(str(run.sequences), shards, len(tok.encoders), tok.field_names, final.columns)
    done = final.groupBy(SHARD).applyInArrow(writer, "shard long, users long, events long").collect()
    for shard in set(range(shards)) - {r["shard"] for r in done}:  # a shard that got no user
        empty = Sequences(np.zeros(1, np.int64), *(np.zeros(0, t) for t in (np.int32,)),
                          np.zeros((0, len(tok.encoders)), np.int32), np.zeros(0, np.int64),
                          np.zeros(0, np.float32), np.zeros(0, np.int8), np.zeros(0, np.int16),
                          np.zeros(0, np.int8), tok.field_names, users=np.zeros(0, np.int64))
        empty.save(shard_folder(run.sequences, shard, shards))
    if shards > 1:
        write_shards_meta(run.sequences, shards, sum(r["users"] for r in done), sum(r["events"] for r in done),
                          tok.field_names)


def _write_events(final, columns: list[str], stage: Path, out: Path) -> None:
    """events.parquet, one file in user-major order: Spark sorts into parts, the driver streams them."""
    sorted_dir = stage / "events"
    keep = [c for c in columns if c != TIME]
    final.orderBy(USER_IDX, TIME_US, FILE_IDX, ROW).select(*keep, TIME_US).write.parquet(str(sorted_dir))
    stream_parts(sorted(sorted_dir.glob("part-*.parquet")), columns, out)


def stream_parts(parts: list[Path], columns: list[str], out: Path, batch_rows: int = EVENT_BATCH_ROWS) -> None:
    """Spark's sorted Parquet parts -> one file `out` in their order with the Polars engine's schema, read
    `batch_rows` rows at a time: the driver never holds a whole part (a part is 1 / shuffle partitions of
    the events)."""
    import pyarrow.parquet as pq

    def table(frame: pl.DataFrame):
        frame = frame.with_columns(pl.from_epoch(TIME_US, time_unit="us").alias(TIME),
                                   pl.col(USER_IDX).cast(pl.UInt32), pl.col(SPLIT).cast(pl.Int8),
                                   *([pl.col(LABEL).cast(pl.Int8)] if LABEL in columns else []),
                                   *([pl.col(SCENARIO).cast(pl.Int16)] if SCENARIO in columns else []))
        return frame.select(columns).to_arrow()

    writer = None
    try:
        for part in parts:
            for batch in pq.ParquetFile(part).iter_batches(batch_size=batch_rows):
                got = table(pl.from_arrow(batch))
                if writer is None:
                    writer = pq.ParquetWriter(out, got.schema)
                writer.write_table(got)
        if writer is None and parts:  # no rows at all: the schema of an empty part
            got = table(pl.read_parquet(parts[0]))
            writer = pq.ParquetWriter(out, got.schema)
            writer.write_table(got)
    finally:
        if writer is not None:
            writer.close()


def _facts(final, users: pl.DataFrame, files: list[str], rows_read: int, dropped: dict[str, int]) -> Facts:
    from pyspark.sql import functions as F

    has_label = LABEL in final.columns
    aggs = [F.count("*").alias("events"), F.countDistinct(USER).alias("users"),
            F.sum((F.col(TOKEN) != UNK).cast("long")).alias("known")]
    if has_label:
        aggs += [F.sum((F.col(LABEL) == 1).cast("long")).alias("pos"), F.sum(F.col(LABEL).isNull().cast("long"))
                 .alias("unknown")]
    rows = final.groupBy(SPLIT).agg(*aggs).collect()
    labels = {}
    if has_label:
        scenarios = None
        if SCENARIO in final.columns:
            scenarios = [(r[SCENARIO], r["count"]) for r in
                         final.where(F.col(SCENARIO) > 0).groupBy(SCENARIO).count().collect()]
        labels = label_counts(sum(r["pos"] for r in rows), sum(r["unknown"] for r in rows), scenarios)
    return Facts(files=files, rows_read=rows_read, rows_kept=sum(r["events"] for r in rows), rows_dropped=dropped,
                 users=users.height, split_rows=[{SPLIT: r[SPLIT], "events": r["events"], "users": r["users"]}
                                                 for r in rows],
                 known_by_split={r[SPLIT]: r["known"] for r in rows}, unk_users=int(users["_unk"].sum()),
                 labels=labels)


def _profile(cfg: DatasetConfig, users: pl.DataFrame) -> pl.DataFrame | None:
    if not cfg.profile.path:
        return None
    table = load_profile_table(Path(cfg.profile.path), cfg)
    return users.select(USER_IDX, USER).join(table, on=USER, how="left").sort(USER_IDX)


def prepare_spark(cfg: DatasetConfig, run: RunDir, master: str | None = None,
                  reused: tuple[StructuredTokenizer, Path] | None = None) -> tuple[StructuredTokenizer, Facts]:
    """Write the run directory with Spark; return the tokenizer (fitted, or `reused`: (tokenizer, its file)
    from prepare.tokenizer_of) and the report's facts."""
    if cfg.source not in SOURCES:
        raise ConfigError(f"--engine spark reads the {' and '.join(SOURCES)} sources (CSV / Parquet paths or a "
                          f"catalog table), not {cfg.source!r}: use --engine polars")
    files = resolve_files(cfg.data) if cfg.table is None else None
    spark = build_session(cfg.spark, master)
    stage = run.path / STAGE
    shutil.rmtree(stage, ignore_errors=True)
    run.path.mkdir(parents=True, exist_ok=True)
    try:
        return _prepare(spark, cfg, run, files, stage, reused)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _stage(spark, df, path: Path):
    """Write and read back: later jobs start from here instead of recomputing the plan."""
    df.write.parquet(str(path))
    return spark.read.parquet(str(path))


class _Clock:
    """Logs the seconds each step took (docs/SPARK.md quotes them)."""

    def __init__(self):
        self.t = time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        log.info("spark prepare: %s %.1f s", step, now - self.t)
        self.t = now


def _prepare(spark, cfg: DatasetConfig, run: RunDir, files: list[Path] | None, stage: Path,
             reused: tuple[StructuredTokenizer, Path] | None = None):
    """`files` None: read the catalog table `cfg.table`."""
    from pyspark.sql import functions as F

    clock = _Clock()
    if files is None:
        rows_read, dropped, names = _read_table(spark, cfg, stage)
        sources = [f"table {cfg.table}"]
    else:
        names = sources = [str(f) for f in files]
        rows_read, dropped = _read(spark, cfg, files, stage)
    clock("read")
    ev, items, item_stats = _join_items(spark, cfg, spark.read.parquet(str(stage / "canonical")))
    canonical = [TIME if c == TIME_US else c for c in ev.columns if c not in (ROW, FILE_IDX)]
    ev = _drop_duplicate_ids(ev, cfg, names, dropped, "table" if files is None else "file")
    ev = _select_users(spark, _stage(spark, _order(ev, cfg, dropped), stage / "ordered"), cfg, dropped)
    present = {r[SPLIT] for r in ev.select(SPLIT).distinct().collect()}
    if not present:
        raise DataError(f"no events left after dropping {dropped}")
    check_split(present, cfg)
    clock("order")
    tok, coded = _fit(spark, cfg, ev, reused[0] if reused else None)
    clock("fit encoders")
    coded = _stage(spark, coded, stage / "coded")
    clock("codes")
    final = _tokens(spark, tok, coded, fit=reused is None)
    users = _users(spark, final)
    clock("vocabulary and users")
    index = spark.createDataFrame(users.select(USER, pl.col(USER_IDX).cast(pl.Int64)).to_pandas())
    final = _stage(spark, final.join(index, USER).withColumn(SHARD, F.col(USER_IDX) % cfg.sequences.shards),
                   stage / "final")
    clock("tokens")
    save_tokenizer(run, tok, reused[1] if reused else None)
    save_toml(cfg, run.config_file)
    _write_sequences(run, cfg, tok, final)
    clock("sequences")
    users.drop("_unk").write_parquet(run.users)
    _write_events(final, [*canonical, GAP, SPLIT, TOKEN, USER_IDX], stage, run.events)
    clock("events.parquet")
    profile = _profile(cfg, users)
    if profile is not None:
        profile.write_parquet(run.profile)
    write_items(run, cfg, items)
    facts = _facts(final, users, sources, rows_read, dropped)
    facts.items = item_stats
    facts.profile_fields = [] if profile is None else [c for c in profile.columns if c not in (USER_IDX, USER)]
    clock("counts")
    return tok, facts
