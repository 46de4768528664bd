"""Benchmark of `prepare --engine spark` against the Polars engine on the fraud handbook (issue 15).

    .venv/bin/python benchmarks/spark.py [--data ../shared/data] [--master local[2]] [--shards 1]

Runs `pantherseq prepare --dataset handbook` twice in fresh processes, once per engine, into temporary run
directories, times each (wall time of the whole process, JVM start included for Spark, and each
process's peak RSS: for Spark the driver's Python; the JVM is a child process), then compares every
output: prepare.json (all keys but wall_s), tokenizer.json, every sequences array, events.parquet and
users.parquet. Asserts 0 token mismatches, prints a table and writes benchmarks/results/spark.json
(the `handbook` part only: the 20M-event scale test and `embed --engine spark` are not done).
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--shards", type=int, default=1)
    args = ap.parse_args()
    data = Path(args.data) / "fraud-handbook"
    if not data.is_dir():
        raise SystemExit(f"{data} not found: pass --data with the shared data folder")
    with tempfile.TemporaryDirectory() as tmp:
        polars = run_prepare(data, Path(tmp) / "polars", "polars", args.master, args.shards)
        spark = run_prepare(data, Path(tmp) / "spark", "spark", args.master, args.shards)
        diff = compare(Path(tmp) / "polars", Path(tmp) / "spark")
    ok = (diff["token_mismatches"] == 0 and not any(diff["array_mismatches"].values())
          and not diff["report_keys_differing"] and diff["tokenizer_identical"] and all(diff["tables_identical"].values()))
    result = {"handbook": {"rows": diff["rows"], "token_mismatches": diff["token_mismatches"],
                           "polars_wall_s": polars["wall_s"], "spark_wall_s": spark["wall_s"],
                           "ratio": round(spark["wall_s"] / polars["wall_s"], 2), "spark_local": args.master,
                           "shards": args.shards, "identical": ok, "compare": diff,
                           "polars_peak_rss_mb": polars["peak_rss_mb"], "spark_steps": spark["steps"]}}
    print(f"handbook {diff['rows']:,} events: polars {polars['wall_s']:.1f} s, spark {args.master} "
          f"{spark['wall_s']:.1f} s ({result['handbook']['ratio']}x); token mismatches {diff['token_mismatches']}; "
          f"identical run directories: {ok}")
    print("spark steps: " + "; ".join(spark["steps"]))
    if not ok:
        raise SystemExit(f"the engines differ: {json.dumps(diff)}")
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
