"""Next-behaviour benchmark (issue: generative pretraining): every model, same data, split and budget.

    .venv/bin/python benchmarks/nextevent.py            # the full run (< 60 minutes on 2 cores)
    .venv/bin/python benchmarks/nextevent.py --quick    # a ~5-minute smoke version (not for the record)

Each model is trained by `pantherseq pretrain` in its own process under the same wall-clock budget
(per dataset, stated in the table; early stopping on validation NDCG@10 may end it sooner), then all are
ranked by `pantherseq evaluate` on the test split, full ranking over the vocabulary, seen items not
masked. RecBole's SASRec runs on MovieLens-100k on the identical split under the same budget, in the
separate bench environment (`benchmarks/bench-env.sh`). PANTHER's ablations (the paper's Table 1 shape)
run on MovieLens-100k and on the simulator. Writes benchmarks/results/nextevent.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
BENCH_PY = REPO / ".venv-bench" / "bin" / "python"
METRICS = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr")
MODELS = ("panther", "transformer", "sasrec", "hstu", "markov", "popular")

DATASETS = {
    # name: (prepare args, model/train overrides, budget seconds full / quick)
    "handbook": {
        "prepare": ["--dataset", "handbook", "--data", "{data}/fraud-handbook"],
        "sets": ["model.max_len=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=2",
                 "model.loss=\"sampled\"", "train.batch_size=128", "train.epochs=30", "train.patience=2",
                 "train.eval_max_users=400"],
        "budget": (240, 40),
        "eval_users": 1000,
        "protocol": "time split: train < 2018-08-01, valid August, test September; every test event of "
                    "1,000 seeded users (the same for every model, ~58K targets) predicted from all earlier "
                    "events of its user (context >= 32 events); UNK targets excluded; full ranking over "
                    "60,004 tokens",
    },
    "movielens100k": {
        "prepare": ["--dataset", "movielens100k"],
        "sets": ["model.max_len=50", "model.d_model=64", "model.n_layers=2", "model.n_heads=2",
                 "model.dropout=0.2", "train.batch_size=128", "train.epochs=200", "train.patience=8",
                 "train.eval_max_users=null"],
        "budget": (180, 30),
        "protocol": "leave-last-out (ties in time keep file order), max length 50, full ranking over all "
                    "1,682 items, seen items not masked",
    },
    "simulated": {
        "prepare": ["--dataset", "simulated"],
        "sets": ["model.max_len=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=2",
                 "train.batch_size=128", "train.epochs=50", "train.patience=3", "train.eval_max_users=500"],
        "budget": (100, 30),
        "protocol": "time split of the built-in simulator (2,000 users, 120 days)",
    },
}

# PANTHER ablations, the paper's Table 1 shape: name -> overrides on top of `panther`
ABLATIONS = {  # None = reuse the model of that name trained in the main table (same config and seed)
    "transformer": None,
    "sprm": ["model.profile_mode=\"none\"", "model.contrastive_lambda=0.0"],
    "sprm+profile_first": ["model.profile_mode=\"first_token\"", "model.contrastive_lambda=0.0"],
    "sprm+profile_pos": ["model.profile_mode=\"positional\"", "model.contrastive_lambda=0.0"],
    "sprm+profile_pos+cl": None,  # = `panther` with its defaults (positional profile, lambda 0.1)
}
REUSE = {"transformer": "transformer", "sprm+profile_pos+cl": "panther"}


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    res = subprocess.run(cmd, text=True, capture_output=True, env=env, check=False, **kw)
    if res.returncode != 0:
        raise SystemExit(f"command failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return res


def pretrain(run: Path, model: str, sets: list[str], budget: int, name: str | None = None) -> dict:
    cmd = [PY, "-m", "pantherseq.cli", "pretrain", "--run", str(run), "--model", model]
    if name:
        cmd += ["--name", name]
    for s in [*sets, f"train.time_budget_s={budget}"]:
        cmd += ["--set", s]
    sh(cmd)
    return json.loads((run / "models" / (name or model) / "metrics.json").read_text())


def evaluate(run: Path, names: list[str], max_users: int | None = None) -> dict:
    extra = ["--max-users", str(max_users)] if max_users else []
    sh([PY, "-m", "pantherseq.cli", "evaluate", "--run", str(run), "--models", ",".join(names), "--split", "test",
        *extra])
    return json.loads((run / "eval.json").read_text())


def bench_dataset(name: str, spec: dict, work: Path, data: str, quick: bool, models=MODELS) -> dict:
    run = work / name
    sh([PY, "-m", "pantherseq.cli", "prepare", *[a.format(data=data) for a in spec["prepare"]], "--out", str(run)])
    budget = spec["budget"][1 if quick else 0]
    train = {m: pretrain(run, m, spec["sets"], budget) for m in models}
    results = evaluate(run, list(models), spec.get("eval_users"))
    out = {"protocol": spec["protocol"], "budget": f"{budget} s of training wall time per model "
           "(+ validation each epoch), early stopping on validation NDCG@10", "models": {}}
    for m in models:
        out["models"][m] = _row(results[m]["test"], train[m])
    return out


def _row(test: dict, train: dict) -> dict:
    return {**{k: round(test[k], 4) for k in METRICS}, "n": test["n"],
            "valid_ndcg@10": round(train["valid"]["ndcg@10"], 4), "epochs": train["epochs"],
            "train_s": train["train_s"], "train_events_per_s": round(train["train_events_per_s"]),
            "peak_mb": round(train["peak_mb"])}


def bench_recbole(work: Path, budget: int) -> dict | None:
    if not BENCH_PY.is_file():
        print("skipping RecBole: run benchmarks/bench-env.sh first", file=sys.stderr)
        return None
    out = work / "recbole_sasrec.json"
    # batch 256 instead of RecBole's default 2048: 8x more steps in the same budget (better for it here)
    sh([str(BENCH_PY), str(REPO / "benchmarks" / "recbole_sasrec.py"), "--run", str(work / "movielens100k"),
        "--budget-s", str(budget), "--batch-size", "256", "--out", str(out)])
    r = json.loads(out.read_text())
    return {**{k: round(r[k], 4) for k in METRICS}, "n": r["n"], "epochs": r["epochs"],
            "train_s": r["train_s"], "train_events_per_s": round(r["train_events_per_s"]),
            "peak_mb": round(r["peak_mb"]), "split_check": r.get("split_check")}


def bench_ablations(work: Path, dataset: str, quick: bool) -> dict:
    spec = DATASETS[dataset]
    run = work / dataset
    budget = spec["budget"][1 if quick else 0]
    rows = {}
    for name, extra in ABLATIONS.items():
        if extra is None:
            metrics = json.loads((run / "models" / REUSE[name] / "metrics.json").read_text())
            rows[name] = (REUSE[name], metrics)
            continue
        metrics = pretrain(run, "panther", spec["sets"] + extra, budget, name=f"abl_{name}")
        rows[name] = (f"abl_{name}", metrics)
    results = evaluate(run, [n for n, _ in rows.values()], spec.get("eval_users"))
    return {name: _row(results[n]["test"], m) for name, (n, m) in rows.items()}


def print_table(title: str, rows: dict) -> None:
    print(f"\n{title}")
    head = f"{'model':<22}" + "".join(f"{m:>8}" for m in METRICS) + f"{'ev/s':>12}{'MB':>7}{'ep':>7}"
    print(head + "\n" + "-" * len(head))
    for name, r in rows.items():
        if r is None:
            continue
        print(f"{name:<22}" + "".join(f"{r[m]:>8.4f}" for m in METRICS)
              + f"{r['train_events_per_s']:>12,}{r['peak_mb']:>7}{r['epochs']:>7}")


def markdown(results: dict) -> str:
    """The results file as the markdown tables of docs/BENCHMARKS.md (no hand transcription)."""
    cols = [*METRICS, "train_events_per_s", "peak_mb", "epochs"]
    out = []

    def table(title: str, rows: dict) -> None:
        out.append(f"\n**{title}**\n")
        out.append("| model | " + " | ".join(c.replace("train_events_per_s", "train events/s") for c in cols) + " |")
        out.append("|---" * (len(cols) + 1) + "|")
        for name, r in rows.items():
            if r:
                cells = [f"{r[c]:.4f}" if c in METRICS else f"{r[c]:,}" for c in cols]
                out.append(f"| {name} | " + " | ".join(cells) + " |")

    for ds in ("handbook", "movielens100k"):
        if ds in results:
            table(f"{ds}: {results[ds]['protocol']}; budget: {results[ds]['budget']}", results[ds]["models"])
    for ds, rows in results.get("ablations", {}).items():
        table(f"PANTHER ablations on {ds} (same budget as its main table)", rows)
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short budgets, for a smoke test")
    parser.add_argument("--data", default=os.environ.get("PANTHERSEQ_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--work", default=str(REPO / "runs" / "bench-nextevent"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "nextevent.json"))
    parser.add_argument("--only", default="handbook,movielens100k,ablations")
    parser.add_argument("--markdown", action="store_true", help="print --out's tables as markdown and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    started = time.time()
    results: dict = {"quick": args.quick}
    if "handbook" in only:
        results["handbook"] = bench_dataset("handbook", DATASETS["handbook"], work, args.data, args.quick)
        print_table("fraud handbook — " + results["handbook"]["budget"], results["handbook"]["models"])
    if "movielens100k" in only:
        ml = bench_dataset("movielens100k", DATASETS["movielens100k"], work, args.data, args.quick)
        ml["models"]["recbole_sasrec"] = bench_recbole(work, DATASETS["movielens100k"]["budget"][args.quick])
        results["movielens100k"] = ml
        print_table("MovieLens-100k — " + ml["budget"], ml["models"])
    if "ablations" in only:
        results["ablations"] = {}
        for ds in ("movielens100k", "simulated"):
            if not (work / ds / "models" / "panther").is_dir():
                bench_dataset(ds, DATASETS[ds], work, args.data, args.quick, models=("transformer", "panther"))
            results["ablations"][ds] = bench_ablations(work, ds, args.quick)
            print_table(f"PANTHER ablations on {ds}", results["ablations"][ds])
    results["wall_s"] = round(time.time() - started)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {args.out} ({results['wall_s']} s)")


if __name__ == "__main__":
    main()
