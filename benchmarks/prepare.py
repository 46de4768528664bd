"""Benchmark of `pantherseq prepare` and of the tokenizer (issue: foundation).

    .venv/bin/python benchmarks/prepare.py [--data ../shared/data] [--repeats 5]

For each dataset, runs `pantherseq prepare` in a fresh process (wall time and that process's peak RSS),
then a second time with top_k = the K that covers 96% of the training events. Then times the
vectorised tokenizer on all handbook events against a per-event Python loop over `transform_one`
(the baseline), and the single-event `transform_one` latency. Prints a table and writes
benchmarks/results/prepare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "prepare.json"


def run_prepare(dataset: str, data: str | None, out: Path, *sets: str) -> dict:
    cmd = [sys.executable, "-m", "pantherseq.cli", "prepare", "--dataset", dataset, "--out", str(out)]
    if data:
        cmd += ["--data", data]
    for s in sets:
        cmd += ["--set", s]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()}")
    report = json.loads((out / "prepare.json").read_text())
    return {"wall_s": round(wall, 2), "peak_mb": round(usage.ru_maxrss / 1024, 1), "report": report}


def bench_dataset(name: str, data: str | None, tmp: Path) -> dict:
    first = run_prepare(name, data, tmp / name)
    rep = first["report"]
    k96 = rep["k_for_96pct"]
    at96 = run_prepare(name, data, tmp / f"{name}-k96", f"tokenizer.top_k={k96}")["report"]
    return {
        "wall_s": first["wall_s"], "peak_mb": first["peak_mb"], "rows_read": rep["rows_read"],
        "rows_kept": rep["rows_kept"], "users": rep["users"], "raw_combinations": rep["raw_combinations"],
        "vocab_size": rep["vocab_size"], "coverage": round(rep["coverage"], 4),
        "train_coverage": round(rep["coverage_by_split"]["train"], 4),
        "k_for_96pct": k96, "coverage_at_k96": round(at96["coverage"], 4),
        "train_coverage_at_k96": round(at96["coverage_by_split"]["train"], 4),
        "unk_users": round(rep["unk_users"], 4),
    }


def bench_tokenizer(run: Path, repeats: int) -> dict:
    from pantherseq.tokenizer import StructuredTokenizer

    tok = StructuredTokenizer.load(run / "tokenizer.json")
    frame = pl.read_parquet(run / "events.parquet")
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        enc = tok.transform(frame)
        times.append(time.perf_counter() - t)
    vec = float(np.median(times))
    sample = frame.sample(20_000, seed=0).to_dicts()
    loop_times, per_event = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        ids = [tok.transform_one(e) for e in sample]
        loop_times.append(time.perf_counter() - t)
    for e in sample[:2000]:
        t = time.perf_counter_ns()
        tok.transform_one(e)
        per_event.append(time.perf_counter_ns() - t)
    check = tok.transform(pl.DataFrame(sample, schema=frame.schema)).tokens
    assert np.array_equal(check, np.asarray(ids)), "transform_one disagrees with transform"
    loop = float(np.median(loop_times)) / len(sample)
    return {
        "events": frame.height, "events_per_s": round(frame.height / vec),
        "loop_events_per_s": round(1 / loop), "speedup_vs_loop": round(loop * frame.height / vec, 1),
        "transform_one_us": round(loop * 1e6, 2),
        "transform_one_p50_us": round(float(np.median(per_event)) / 1000, 2),
        "transform_one_p99_us": round(float(np.percentile(per_event, 99)) / 1000, 2),
        "coverage_check": round(float(np.mean(enc.tokens != 1)), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("PANTHERSEQ_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    data = Path(args.data)
    datasets = {"handbook": str(data / "fraud-handbook"), "tabformer": str(data / "tabformer"),
                "movielens100k": None, "simulated": None}
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        for name, path in datasets.items():
            if path is not None and not Path(path).exists():
                print(f"skipping {name}: {path} not found", file=sys.stderr)
                continue
            results[name] = bench_dataset(name, path, tmp_path)
        if "handbook" in results:
            results["tokenizer"] = bench_tokenizer(tmp_path / "handbook", args.repeats)
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "polars": pl.__version__, "date": time.strftime("%Y-%m-%d")}
    print_table(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {args.out}")


def print_table(results: dict) -> None:
    head = f"{'dataset':<14}{'rows':>11}{'wall s':>8}{'peak MB':>9}{'vocab':>8}{'cov@K':>8}{'K96':>8}" \
           f"{'cov@K96':>9}{'UNK users':>10}"
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        if name in ("tokenizer", "machine"):
            continue
        print(f"{name:<14}{r['rows_read']:>11,}{r['wall_s']:>8.1f}{r['peak_mb']:>9.0f}{r['vocab_size']:>8,}"
              f"{r['coverage']:>8.2%}{r['k_for_96pct']:>8,}{r['coverage_at_k96']:>9.2%}{r['unk_users']:>10.2%}")
    tok = results.get("tokenizer")
    if tok:
        print(f"\ntokenizer on {tok['events']:,} handbook events: vectorised {tok['events_per_s']:,} events/s, "
              f"per-event loop (baseline) {tok['loop_events_per_s']:,} events/s "
              f"({tok['speedup_vs_loop']}x); transform_one {tok['transform_one_us']} us mean, "
              f"p50 {tok['transform_one_p50_us']} us, p99 {tok['transform_one_p99_us']} us")


if __name__ == "__main__":
    main()
