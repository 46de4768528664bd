"""Benchmark of the Spark engine against one process on the fraud handbook (issue 15): `prepare` and `embed`.

    .venv/bin/python benchmarks/spark.py [--data ../shared/data] [--master local[2]] [--shards 1]
                                         [--only handbook|embed]

Runs `pantherseq prepare --dataset handbook` twice in fresh processes, once per engine, into temporary run
directories, times each (wall time of the whole process, JVM start included for Spark, and each
process's peak RSS: for Spark the driver's Python; the JVM is a child process), then compares every
output: prepare.json (all keys but wall_s), tokenizer.json, every sequences array, events.parquet and
users.parquet. Asserts 0 token mismatches and writes the `handbook` entry of benchmarks/results/spark.json.

The `embed` part prepares the handbook (Polars), pretrains a tiny `panther` (EMBED_MODEL: d_model 32, one
layer, one epoch), then runs `pantherseq embed` in one process and `embed --engine spark` (the same master)
into two SQLite stores, each a fresh process, and compares every user's state: the max |difference| of `h`
and `pooled` (asserted <= 1e-6; `top_p` and `recent_delta` reported too) and each engine's users/s (users
over the `seconds` the store's `embed` meta records: the embed itself, the Spark session's start included;
each process's wall time too). It writes the `embed` entry. `--only` runs one part and keeps the file's
other entry; the 20M-event scale test is not here.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "spark.json"
ARRAYS = ("offsets", "tokens", "codes", "time", "gap", "label", "scenario", "split")
EMBED_MODEL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_prototypes=16", "train.epochs=1",
               "train.eval_max_users=200", "train.threads=2"]
TOLERANCE = 1e-6


def pantherseq(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    """`pantherseq ARGS` in a fresh process: (the finished process, its wall time in s); exits on failure."""
    started = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "pantherseq"), *args], check=False,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pantherseq {' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
    return proc, round(time.perf_counter() - started, 2)


def _states(url: str, users: list[str]) -> tuple[dict, dict]:
    """(the store's `embed` meta, user_id -> UserState)."""
    from pantherseq.serve.state import UserState
    from pantherseq.store import open_store

    with open_store(url) as store:
        meta = json.loads(store.get_meta("embed"))
        got = store.get_many(users)
    return meta, {u: UserState.decode(v) for u, v in zip(users, got) if v is not None}


def _max_diff(a: dict, b: dict, name: str) -> float:
    worst = 0.0
    for user, x in a.items():
        u, v = np.asarray(getattr(x, name), np.float64), np.asarray(getattr(b[user], name), np.float64)
        if u.shape != v.shape or not np.array_equal(np.isnan(u), np.isnan(v)):
            return float("inf")
        if u.size:
            worst = max(worst, float(np.nanmax(np.abs(u - v), initial=0.0)))
    return worst


def run_embed(data: Path, tmp: Path, master: str, shards: int) -> dict:
    """The `embed` part (module doc)."""
    run = tmp / "run"
    _, prepare_s = pantherseq("prepare", "--dataset", "handbook", "--data", str(data), "--out", str(run),
                              "--set", f"sequences.shards={shards}")
    sets = [a for kv in EMBED_MODEL for a in ("--set", kv)]
    _, pretrain_s = pantherseq("pretrain", "--run", str(run), "--model", "panther", *sets)
    one, spark = f"sqlite:///{tmp / 'single.db'}", f"sqlite:///{tmp / 'spark.db'}"
    _, single_wall = pantherseq("embed", "--run", str(run), "--store", one)
    _, spark_wall = pantherseq("embed", "--run", str(run), "--store", spark, "--engine", "spark",
                               "--spark-master", master, "--states-parquet", str(tmp / "states.parquet"))
    users = pl.read_parquet(run / "users.parquet")["user_id"].cast(pl.Utf8).to_list()
    (m1, a), (m2, b) = _states(one, users), _states(spark, users)
    if a.keys() != b.keys() or len(a) != m1["users"] or len(b) != m2["users"]:
        raise SystemExit(f"the engines embedded different users: {len(a)} vs {len(b)}")
    diffs = {name: _max_diff(a, b, name) for name in ("h", "pooled", "top_p", "recent_delta")}
    same_ids = all(np.array_equal(x.top_ids, b[u].top_ids) and np.array_equal(x.tokens, b[u].tokens)
                   for u, x in a.items())
    return {"users": len(a), "max_abs_diff": max(diffs["h"], diffs["pooled"]), "max_abs_diff_by_field": diffs,
            "windows_and_top_ids_equal": same_ids, "tolerance": TOLERANCE,
            "single_users_per_s": round(len(a) / m1["seconds"], 1),
            "spark_users_per_s": round(len(b) / m2["seconds"], 1),
            "single_embed_s": m1["seconds"], "spark_embed_s": m2["seconds"], "single_process_wall_s": single_wall,
            "spark_process_wall_s": spark_wall, "spark_local": master, "shards": shards,
            "recent_delta_rows": sum(len(x.recent_delta) for x in a.values()),
            "model": "panther " + " ".join(EMBED_MODEL), "prepare_s": prepare_s, "pretrain_s": pretrain_s}


def run_prepare(data: Path, out: Path, engine: str, master: str, shards: int) -> dict:
    cmd = [str(Path(sys.executable).parent / "pantherseq"), "-v", "prepare", "--dataset", "handbook",
           "--data", str(data), "--out", str(out), "--engine", engine, "--set", f"sequences.shards={shards}"]
    if engine == "spark":
        cmd += ["--spark-master", master]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{engine} prepare failed:\n{proc.stderr[-3000:]}")
    steps = [line.split("spark prepare: ", 1)[1] for line in proc.stderr.splitlines() if "spark prepare: " in line]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(max(peak, before) / 1024, 1), "steps": steps}


def compare(a: Path, b: Path) -> dict:
    """Mismatch counts between two run directories (0 everywhere = identical)."""
    from pantherseq.data.sequences import Sequences

    ja, jb = (json.loads((p / "prepare.json").read_text()) for p in (a, b))
    report_keys = [k for k in ja if k != "wall_s" and ja[k] != jb.get(k)]
    tokenizer_same = json.loads((a / "tokenizer.json").read_text()) == json.loads((b / "tokenizer.json").read_text())
    sa, sb = Sequences.load(a / "sequences"), Sequences.load(b / "sequences")
    arrays = {}
    for name in ARRAYS:
        x, y = np.asarray(getattr(sa, name)), np.asarray(getattr(sb, name))
        same_nan = np.isnan(x) & np.isnan(y) if x.dtype.kind == "f" else np.zeros(x.shape, bool)
        arrays[name] = int(x.size + y.size) if x.shape != y.shape else int(((x != y) & ~same_nan).sum())
    tables = {name: pl.read_parquet(a / name).equals(pl.read_parquet(b / name))
              for name in ("events.parquet", "users.parquet")}
    return {"rows": sa.n_events, "token_mismatches": arrays["tokens"], "array_mismatches": arrays,
            "report_keys_differing": report_keys, "tokenizer_identical": tokenizer_same, "tables_identical": tables}


def run_handbook(data: Path, master: str, shards: int) -> dict:
    """The `prepare` part (module doc)."""
    with tempfile.TemporaryDirectory() as tmp:
        polars = run_prepare(data, Path(tmp) / "polars", "polars", master, shards)
        spark = run_prepare(data, Path(tmp) / "spark", "spark", master, shards)
        diff = compare(Path(tmp) / "polars", Path(tmp) / "spark")
    ok = (diff["token_mismatches"] == 0 and not any(diff["array_mismatches"].values())
          and not diff["report_keys_differing"] and diff["tokenizer_identical"] and all(diff["tables_identical"].values()))
    result = {"rows": diff["rows"], "token_mismatches": diff["token_mismatches"],
              "polars_wall_s": polars["wall_s"], "spark_wall_s": spark["wall_s"],
              "ratio": round(spark["wall_s"] / polars["wall_s"], 2), "spark_local": master,
              "shards": shards, "identical": ok, "compare": diff,
              "polars_peak_rss_mb": polars["peak_rss_mb"], "spark_steps": spark["steps"]}
    print(f"handbook {diff['rows']:,} events: polars {polars['wall_s']:.1f} s, spark {master} "
          f"{spark['wall_s']:.1f} s ({result['ratio']}x); token mismatches {diff['token_mismatches']}; "
          f"identical run directories: {ok}")
    print("spark steps: " + "; ".join(spark["steps"]))
    if not ok:
        raise SystemExit(f"the engines differ: {json.dumps(diff)}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--only", choices=("handbook", "embed"), help="run one part; the file's other entry is kept")
    args = ap.parse_args()
    data = Path(args.data) / "fraud-handbook"
    if not data.is_dir():
        raise SystemExit(f"{data} not found: pass --data with the shared data folder")
    result = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.only in (None, "handbook"):
        result["handbook"] = run_handbook(data, args.master, args.shards)
    if args.only in (None, "embed"):
        with tempfile.TemporaryDirectory() as tmp:
            e = result["embed"] = run_embed(data, Path(tmp), args.master, args.shards)
        print(f"embed {e['users']:,} users: one process {e['single_users_per_s']:,.1f} users/s "
              f"({e['single_embed_s']:.1f} s), spark {args.master} {e['spark_users_per_s']:,.1f} users/s "
              f"({e['spark_embed_s']:.1f} s); max |diff| h/pooled {e['max_abs_diff']:.2e} "
              f"(by field {e['max_abs_diff_by_field']})")
        if not e["max_abs_diff"] <= TOLERANCE or not e["windows_and_top_ids_equal"]:
            raise SystemExit(f"the engines' states differ: {json.dumps(e)}")
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {RESULTS}")

if __name__ == "__main__":
    main()
