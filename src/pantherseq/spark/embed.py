"""`embed --engine spark`: every user's serving state computed in the Spark executors (docs/SPARK.md).

The single-process `embed` (serve/embed.py `embed_users`) as one Spark job:
1. plan      the driver checks the store's owner (serve/identity.py), then cuts the users into tasks: each
             task is a range of one shard's local users (data/sequences.py; a one-shard run is one shard);
2. compute   `mapInArrow`: each task memory-maps its shard, reads its users' amounts from events.parquet
             and runs `serve/embed.shard_states` (what the single-process `embed` runs shard by shard: the same
             windows, the same float64 forward pass rounded once) with the model of a `Scorer` loaded once per
             Python worker;
             the driver's model version and tokenizer digest are broadcast and every worker checks that its
             model is that one; the states' `recent_delta` by `serve/embed.recent_deltas` over the task's
             users only (`RunData.of_sequences`: the fraud pass's `behaviour_features`, each user's own
             history);
3. write     the states to Parquet (`user_id`, `user_idx`, `n_events`, `last_time`, `h`, `pooled`, `state` =
             the store's byte format, serve/state.py), then into the store: SQLite from the driver (one
             writer), Redis from the executors (`foreachPartition`); the `embed` meta and the owner record
             from the driver last.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

from pantherseq.data.schema import SparkConfig
from pantherseq.data.sequences import load_shard, shard_count
from pantherseq.errors import ConfigError
from pantherseq.serve.embed import embed_meta, finish_embed, shard_states
from pantherseq.serve.identity import check_owner
from pantherseq.serve.scorer import Scorer, parse_time
from pantherseq.spark.session import build_session
from pantherseq.store import open_store

log = logging.getLogger(__name__)
EXECUTOR_STORES = ("redis",)  # written from the executors; any other scheme (sqlite) from the driver
_SCORERS: dict[tuple, Scorer] = {}  # one Scorer per Python worker and model (workers are reused)


def _scorer(run: str, model: str, fraud_dir: str | None, threads: int, version: str, run_id: str) -> Scorer:
    key = (run, model, fraud_dir, threads)
    if key not in _SCORERS:
        _SCORERS[key] = Scorer(run, model, fraud_dir, threads=threads)
    scorer = _SCORERS[key]
    if (scorer.model_version, scorer.run_id) != (version, run_id):
        raise ConfigError(f"an executor loaded {scorer.model_version} of run {scorer.run_id}, the driver "
                          f"{version} of run {run_id}: the checkpoint changed during the job")
    return scorer


def _tasks(folder: Path, users_per_task: int) -> list[tuple[int, int, int]]:
    """(shard, first local user, end) ranges of at most `users_per_task` users, every shard covered."""
    out = []
    for shard in range(shard_count(folder)):
        n = load_shard(folder, shard).n_users
        out.extend((shard, lo, min(lo + users_per_task, n)) for lo in range(0, n, users_per_task))
    return out


def _compute(broadcast):
    """mapInArrow body: each input row (shard, lo, hi) -> the states of those users as Arrow rows."""
    import pyarrow as pa

    schema = state_schema()

    def run(batches):
        job = broadcast.value
        scorer = _scorer(job["run"], job["model"], job["fraud_dir"], job["threads"], job["version"], job["run_id"])
        folder = scorer.run.sequences
        for batch in batches:
            for shard, lo, hi in zip(*(batch.column(c).to_pylist() for c in ("shard", "lo", "hi"))):
                seq = load_shard(folder, shard).take_users(np.arange(lo, hi))  # copies only these users' rows
                for states in shard_states(scorer, seq, job["cut_s"], job["batch_size"], now=job["now"]):
                    yield pa.RecordBatch.from_pylist([{
                        "user_id": s.user_id, "user_idx": s.user_idx, "n_events": s.n_events,
                        "last_time": s.last_time, "h": s.h.tolist(), "pooled": s.pooled.tolist(),
                        "state": s.encode()} for s in states], schema=schema)
    return run


def state_schema():
    import pyarrow as pa

    return pa.schema([("user_id", pa.string()), ("user_idx", pa.int64()), ("n_events", pa.int64()),
                      ("last_time", pa.int64()), ("h", pa.list_(pa.float32())), ("pooled", pa.list_(pa.float32())),
                      ("state", pa.binary())])


def _put_from_executors(url: str):
    def put(rows) -> None:
        with open_store(url) as store:
            chunk = {}
            for row in rows:
                chunk[row["user_id"]] = bytes(row["state"])
                if len(chunk) >= 1000:
                    store.put_many(chunk)
                    chunk = {}
            if chunk:
                store.put_many(chunk)
    return put


def _put_from_driver(store, parquet: Path) -> None:
    """Stream the states Parquet into the store, 4,096 users at a time (the driver never holds them all)."""
    import pyarrow.dataset as ds

    for batch in ds.dataset(str(parquet), format="parquet").to_batches(columns=["user_id", "state"], batch_size=4096):
        store.put_many(dict(zip(batch.column("user_id").to_pylist(), batch.column("state").to_pylist())))


def embed_spark(scorer: Scorer, store_url: str, out: str | Path, until: str | None = None, batch_size: int = 256,
                migrate: bool = False, spark_cfg: SparkConfig | None = None, master: str | None = None,
                fraud_dir: str | None = None, threads: int = 1, users_per_task: int | None = None) -> dict:
    """Every user's state computed by Spark, written to `out` (a Parquet folder) and to the store at
    `store_url`; returns the store's `embed` meta (plus `parquet` and `tasks`)."""
    started = time.perf_counter()
    with open_store(store_url) as store:
        check_owner(store, scorer.run_id, scorer.model_version, migrate)  # ConfigError: another run / model
    spark = build_session(spark_cfg or scorer.cfg.spark, master)
    folder = scorer.run.sequences
    n_users = scorer.run.read_users().height
    parallel = max(int(spark.sparkContext.defaultParallelism), 1)
    per_task = users_per_task or max(256, math.ceil(n_users / (4 * parallel)))
    tasks = _tasks(folder, per_task)
    job = spark.sparkContext.broadcast({"run": str(scorer.run.path.resolve()), "model": scorer.model_name, "fraud_dir": fraud_dir,
           "threads": threads, "version": scorer.model_version, "run_id": scorer.run_id,
           "cut_s": parse_time(until)[0] if until else None, "batch_size": batch_size, "now": time.time()})
    plan = spark.createDataFrame(tasks, "shard long, lo long, hi long").repartition(len(tasks))
    from pyspark.sql.pandas.types import from_arrow_schema

    states = plan.mapInArrow(_compute(job), from_arrow_schema(state_schema()))  # job: the broadcast
    out = Path(out)
    states.write.mode("overwrite").parquet(str(out.resolve()))
    scheme = store_url.partition(":")[0]
    written = spark.read.parquet(str(out.resolve()))
    n_written = written.count()
    with open_store(store_url) as store:
        if scheme in EXECUTOR_STORES:
            written.select("user_id", "state").foreachPartition(_put_from_executors(store_url))
        else:
            _put_from_driver(store, out)
        meta = embed_meta(scorer, until, n_written, time.perf_counter() - started, engine="spark",
                          master=spark.sparkContext.master)
        finish_embed(store, scorer, meta)
    log.info("embedded %d users with Spark in %.1f s (%d tasks)", n_written, meta["seconds"], len(tasks))
    return {**meta, "parquet": str(out), "tasks": len(tasks)}


__all__ = ["EXECUTOR_STORES", "embed_spark", "state_schema"]
