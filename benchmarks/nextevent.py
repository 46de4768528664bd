"""Next-behaviour benchmark (issue 12): every model, same data, split, protocol, max epochs and seeds.

    .venv/bin/python benchmarks/nextevent.py --dataset simulated       # each dataset alone, <= 60 min
    .venv/bin/python benchmarks/nextevent.py --dataset movielens100k
    .venv/bin/python benchmarks/nextevent.py --dataset handbook        # one seed (the data is large)
    .venv/bin/python benchmarks/nextevent.py --dataset recbole_sasrec
                         # RecBole's SASRec to its own convergence on the identical MovieLens split
                         # (needs bash benchmarks/bench-env.sh; prepares the split if missing)
    add --threads 1 to run two of them side by side on a 2-core machine
    .venv/bin/python benchmarks/nextevent.py --dataset simulated --quick   # smoke run, writes nothing

Protocol: quality at convergence. Every neural model trains for at most `max_epochs` with early stopping
on validation NDCG@10 (`patience`), the best epoch's weights kept, for each seed; count models
(personal, popular, markov) are fitted once. Each (model, seed) runs `pantherseq pretrain` in its own
process, then `pantherseq evaluate` ranks every test target over the whole vocabulary. Neural models run
plain and with the copy + per-field heads (`+copy`; transformer and panther, the two the heads were
built for — sasrec/hstu with them were left out to fit the time budget), so a table shows where the heads
help. Every neural model sees the same inputs (INPUTS: the event fields and the time gap). Reported per
model: mean and std over seeds of HR@1/5/10, NDCG@5/10, MRR and the repeat / explore HR@10 (targets
already in the user's history vs new to the user), and the cost: epochs, CPU-seconds of training
(the child process's user + system time), training events/s, peak RSS, parameters.
Each dataset's block is merged into benchmarks/results/nextevent.json (the other keys are kept; the SPRM
cost curve comes from benchmarks/sprm_cost.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
BENCH_PY = REPO / ".venv-bench" / "bin" / "python"
RESULTS = REPO / "benchmarks" / "results" / "nextevent.json"
METRICS = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr", "repeat_hr@10", "explore_hr@10")
COUNT_MODELS = ("personal", "popular", "markov")
NEURAL = ("transformer", "sasrec", "hstu", "panther")
COPY_ROWS = ("transformer", "panther")  # run plain and with the heads (sasrec/hstu + heads: left out for time)
HEADS = ["model.copy_head=true", "model.field_heads=true"]
NO_HEADS = ["model.copy_head=false", "model.field_heads=false"]  # the plain rows (the heads are on by default)
# within a dataset every neural model sees the same inputs: on the payments data the token, each event field
# (time of day, weekday, amount, channel...) and the time gap since the previous event; on MovieLens the item
# token alone (one seed, 27 epochs: PANTHER test HR@10 .1298 with the item alone vs .1266 with the fields)
INPUTS = ["model.field_embeddings=true", "model.time_gap=true"]
ITEM_ONLY = ["model.field_embeddings=false", "model.time_gap=false"]

DATASETS = {
    "movielens100k": {
        "prepare": ["--dataset", "movielens100k"],
        "sets": ["model.max_len=50", "model.dropout=0.2", "train.batch_size=128", "train.patience=5",
                 "train.eval_max_users=null"],
        "max_epochs": (40, 3), "seeds": (0, 1, 2), "inputs": ITEM_ONLY,
        "protocol": "leave-last-out (ties in time keep file order), max length 50, full ranking over all "
                    "1,682 items, seen items not masked",
    },
    "simulated": {
        "prepare": ["--dataset", "simulated"],
        "sets": ["model.max_len=64", "train.batch_size=128", "train.patience=2", "train.eval_max_users=500"],
        "max_epochs": (6, 1), "seeds": (0, 1, 2),
        "protocol": "time split of the built-in simulator (2,000 users, 120 days); every test event "
                    "predicted from all earlier events of its user; UNK targets excluded",
    },
    "handbook": {
        "prepare": ["--dataset", "handbook", "--data", "{data}/fraud-handbook"],
        "sets": ["model.max_len=64", "model.loss=\"sampled\"", "train.batch_size=128", "train.patience=2",
                 "train.eval_max_users=400"],
        "max_epochs": (2, 1), "seeds": (0,), "eval_users": 1000,
        "protocol": "time split: train < 2018-08-01, valid August, test September; every test event of "
                    "1,000 seeded users (the same for every model) predicted from all earlier events of its "
                    "user; UNK targets excluded; full ranking over the vocabulary",
    },
}


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    res = subprocess.run(cmd, text=True, capture_output=True, env=env, check=False, **kw)
    if res.returncode != 0:
        raise SystemExit(f"command failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return res


def pretrain(run: Path, model: str, sets: list[str], name: str) -> dict:
    """Train one (model, config, seed) in a child process; its metrics.json plus the child's CPU-seconds."""
    cmd = [PY, "-m", "pantherseq.cli", "pretrain", "--run", str(run), "--model", model, "--name", name]
    for s in sets:
        cmd += ["--set", s]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    sh(cmd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    metrics = json.loads((run / "models" / name / "metrics.json").read_text())
    metrics["cpu_s"] = round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1)
    return metrics


def evaluate(run: Path, names: list[str], max_users: int | None = None) -> dict:
    extra = ["--max-users", str(max_users)] if max_users else []
    sh([PY, "-m", "pantherseq.cli", "evaluate", "--run", str(run), "--models", ",".join(names), "--split", "test",
        *extra])
    return json.loads((run / "eval.json").read_text())


def variants(inputs: list[str]) -> dict[str, tuple[str, list[str]]]:
    """Table row name -> (registry model, extra overrides)."""
    out = {m: (m, []) for m in COUNT_MODELS}
    for m in NEURAL:
        out[m] = (m, [*inputs, *NO_HEADS])
        if m in COPY_ROWS:
            out[f"{m}+copy"] = (m, [*inputs, *HEADS])
    return out


def prepare(name: str, work: Path, data: str) -> Path:
    run = work / name
    sh([PY, "-m", "pantherseq.cli", "prepare", *[a.format(data=data) for a in DATASETS[name]["prepare"]],
        "--out", str(run), "--force"])
    return run


def bench_dataset(name: str, work: Path, data: str, quick: bool, threads: int | None) -> dict:
    spec = DATASETS[name]
    run = prepare(name, work, data)
    max_epochs = spec["max_epochs"][1 if quick else 0]
    seeds = spec["seeds"][:1] if quick else spec["seeds"]
    trained: dict[str, list[tuple[str, dict]]] = {}
    inputs = spec.get("inputs", INPUTS)
    for row, (model, extra) in variants(inputs).items():
        for seed in (seeds[:1] if model in COUNT_MODELS else seeds):
            tag = f"{row.replace('+', '_')}_s{seed}"
            sets = [*spec["sets"], *extra, f"train.epochs={max_epochs}", f"train.seed={seed}"]
            if threads:
                sets.append(f"train.threads={threads}")
            trained.setdefault(row, []).append((tag, pretrain(run, model, sets, tag)))
    results = evaluate(run, [t for runs in trained.values() for t, _ in runs], spec.get("eval_users"))
    rows = {row: aggregate([results[t]["test"] for t, _ in runs], [m for _, m in runs])
            for row, runs in trained.items()}
    for row, runs in trained.items():
        if row.startswith("panther"):
            rows[row]["prototype_attention"] = peakedness(run, [t for t, _ in runs])
    return {"protocol": spec["protocol"], "max_epochs": max_epochs, "seeds": list(seeds),
            "early_stopping": "validation NDCG@10", "inputs": inputs, "heads_for_+copy": HEADS,
            "overrides": spec["sets"], "threads": threads, "models": rows}


def aggregate(tests: list[dict], train: list[dict]) -> dict:
    """Mean and std over seeds ([mean, std]; std 0 for one run) plus the cost columns."""
    def ms(values: list[float]) -> list[float]:
        return [round(statistics.fmean(values), 4), round(statistics.stdev(values), 4) if len(values) > 1 else 0.0]

    out = {k: ms([t[k] for t in tests]) for k in METRICS}
    out |= {"n": tests[0]["n"], "epochs": [m["epochs"] for m in train], "train_cpu_s": ms([m["cpu_s"] for m in train]),
            "train_events_per_s": round(statistics.fmean(m["train_events_per_s"] for m in train)),
            "peak_mb": round(max(m["peak_mb"] for m in train)), "n_params": train[0].get("n_params", 0)}
    return out


def peakedness(run: Path, names: list[str]) -> dict:
    """How peaked the SPRM prototype attention is (the paper's Fig. 3), from RUN/prototypes.json: the mean
    over the analysed 3-grams of a row's largest weight (uniform = 1/M) and of its entropy / ln M (1 =
    uniform), mean over seeds."""
    import numpy as np

    data = json.loads((run / "prototypes.json").read_text())
    rows = [np.asarray(data[n]["attention"]) for n in names if "attention" in data.get(n, {})]
    if not rows:
        return {}
    top = [float(a.max(1).mean()) for a in rows]
    ent = [float((-(a * np.log(np.clip(a, 1e-12, None))).sum(1) / np.log(a.shape[1])).mean()) for a in rows]
    return {"row_max": round(statistics.fmean(top), 4), "uniform": round(1 / rows[0].shape[1], 4),
            "entropy_over_log_m": round(statistics.fmean(ent), 4)}


def bench_recbole(work: Path, data: str, budget_s: float, reuse: bool = False) -> dict:
    """RecBole 1.2.1 SASRec on the identical MovieLens split, trained to its own early stopping. `reuse`: take
    the result file a previous run of benchmarks/recbole_sasrec.py wrote in the work folder (no training)."""
    if not BENCH_PY.is_file():
        raise SystemExit("RecBole needs its own environment: run bash benchmarks/bench-env.sh first")
    work = work / "recbole"
    out = work / "recbole_sasrec.json"
    if reuse and not out.is_file():
        raise SystemExit(f"--reuse: no {out} (run without --reuse first)")
    # batch 256 instead of RecBole's default 2048 (8x the steps per epoch); a cap on training time in case
    # its own early stopping (10 epochs without a better validation NDCG@10) has not ended it; stop_reason says
    if not reuse:
        prepare("movielens100k", work, data)
        sh([str(BENCH_PY), str(REPO / "benchmarks" / "recbole_sasrec.py"), "--run", str(work / "movielens100k"),
            "--budget-s", str(budget_s), "--batch-size", "256", "--out", str(out)])
    r = json.loads(out.read_text())
    # RecBole's runner ranks with our metrics but has no repeat / explore split (no user on MovieLens repeats)
    return {**{k: round(r[k], 4) for k in METRICS if k in r}, "wall_s": round(r["wall_s"]), "n": r["n"], "epochs": r["epochs"],
            "best_epoch": r["best_epoch"], "stop_reason": r["stop_reason"], "budget_s": r.get("budget_s", budget_s),
            "train_s": r["train_s"], "train_events_per_s": round(r["train_events_per_s"]),
            "peak_mb": round(r["peak_mb"]), "split_check": r.get("split_check")}


def print_table(title: str, rows: dict) -> None:
    print(f"\n{title}")
    head = f"{'model':<20}" + "".join(f"{m:>15}" for m in METRICS) + f"{'cpu s':>9}{'ev/s':>9}{'MB':>7}"
    print(head + "\n" + "-" * len(head))
    for name, r in rows.items():
        if r:
            print(f"{name:<20}" + "".join(f"{r[m][0]:>8.4f}±{r[m][1]:<6.4f}" for m in METRICS)
                  + f"{r['train_cpu_s'][0]:>9.0f}{r['train_events_per_s']:>9,}{r['peak_mb']:>7}")


def markdown(results: dict) -> str:
    """The results file as the markdown tables of docs/BENCHMARKS.md (no hand transcription)."""
    out = []
    for ds in ("movielens100k", "simulated", "handbook"):
        block = results.get(ds)
        if not block or "models" not in block or "max_epochs" not in block:
            continue
        out.append(f"\n**{ds}** — {block['protocol']}; at most {block['max_epochs']} epochs, early stopping on "
                   f"{block['early_stopping']}, seeds {block['seeds']} (mean ± std)\n")
        out.append("| model | " + " | ".join(METRICS) + " | train CPU-s | events/s | peak MB | params |")
        out.append("|---" * (len(METRICS) + 5) + "|")
        for name, r in block["models"].items():
            if r:
                cells = [f"{r[m][0]:.4f} ± {r[m][1]:.4f}" for m in METRICS]
                out.append(f"| {name} | " + " | ".join(cells) + f" | {r['train_cpu_s'][0]:,.0f} | "
                           f"{r['train_events_per_s']:,} | {r['peak_mb']:,} | {r['n_params']:,} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=False, choices=[*DATASETS, "recbole_sasrec"],
                        help="the dataset to run (recbole_sasrec: RecBole's SASRec on the MovieLens split)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per training (default: torch's); 1 to run two benchmarks side by side")
    parser.add_argument("--recbole-budget-s", type=float, default=7200,
                        help="recbole_sasrec: cap on its training time (its early stopping usually ends it)")
    parser.add_argument("--reuse", action="store_true",
                        help="recbole_sasrec: summarise the result file of an earlier run in --work, no training")
    parser.add_argument("--quick", action="store_true", help="one seed, one or a few epochs; writes nothing")
    parser.add_argument("--data", default=os.environ.get("PANTHERSEQ_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--work", default=str(REPO / "runs" / "bench-nextevent"))
    parser.add_argument("--markdown", action="store_true", help="print the results file's tables and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(RESULTS.read_text())))
        return
    if not args.dataset:
        parser.error("--dataset is required (each dataset runs alone)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if args.dataset == "recbole_sasrec":
        block = bench_recbole(work, args.data, args.recbole_budget_s, args.reuse)
        if not args.reuse:
            block["wall_s"] = round(time.time() - started)
        print(json.dumps(block, indent=1))
        merge("recbole_sasrec_converged", block)
        return
    block = bench_dataset(args.dataset, work, args.data, args.quick, args.threads)
    block["wall_s"] = round(time.time() - started)
    print_table(f"{args.dataset}: at most {block['max_epochs']} epochs, seeds {block['seeds']}", block["models"])
    if args.quick:
        print("\n--quick: nothing written")
        return
    merge(args.dataset, block)


def merge(key: str, block: dict) -> None:
    """Write one key of the results file, keeping the others (each dataset runs alone)."""
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[key] = block
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {RESULTS} [{key}] ({block['wall_s']} s)")


if __name__ == "__main__":
    main()
