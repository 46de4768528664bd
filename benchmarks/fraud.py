"""Benchmark of `pantherseq fraud` (issues 4 and 13) on the Fraud Detection Handbook data and the simulator.

    .venv/bin/python benchmarks/fraud.py [--dataset handbook|simulated] [--data DIR] [--work runs/fraud-DATASET]
        [--backbones panther,transformer] [--epochs N] [--out benchmarks/results/fraud.json]

Handbook protocol (docs/FRAUD.md): `prepare` with train < 2018-05-25 <= valid < 2018-06-01 <= test, so the
generative models learn from April 1 .. May 24 and early-stop on May 25-31; the risk models train on
June and July (2018-06-01 .. 07-31, deviation features out-of-sample), a one-week gap (the label delay),
test 2018-08-08 .. 2018-09-30. `--dataset simulated` does the same on the built-in simulator (its default
config with 4,000 users, 120 days from 2024-01-01, so that every scenario,
the behaviour-only 5 and 6 included, has frauds in the test period): generative models before
2024-02-22, risk model March, test 2024-04-08 .. 04-30. Each backbone is pretrained to convergence (at
most `--epochs` epochs, early stopping with patience 2: the budget is epochs, not seconds) then scored in
its own process, one thread each, the backbones side by side (the machine has two cores). The risk model
early-stops on customers it does not fit and is refit on the whole training period; the feature sets are
the five of fraud/hybrid.py, hybrid − embedding (= baseline+deviation) being the embedding ablation.
Prints the table and writes benchmarks/results/fraud.json (fraud-simulated.json for the simulator),
after each backbone finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# per dataset: the prepare split (generative model: train < t1, early stopping until t2) and the fraud periods
SETUPS = {
    "handbook": {
        "split": {"t1": "2018-05-25", "t2": "2018-06-01"},
        "fraud": {"train_start": "2018-06-01", "train_end": "2018-08-01", "test_start": "2018-08-08",
                  "test_end": "2018-10-01"},
        "out": RESULTS / "fraud.json", "epochs": 5, "prepare": [],
    },
    # the simulator's 120 default days from 2024-01-01: its account-takeover / routine-change fraud
    "simulated": {
        "split": {"t1": "2024-02-22", "t2": "2024-03-01"},
        "fraud": {"train_start": "2024-03-01", "train_end": "2024-04-01", "test_start": "2024-04-08",
                  "test_end": "2024-05-01"},
        "out": RESULTS / "fraud-simulated.json", "epochs": 8,
        "prepare": ["simulate.n_users=4000"],
    },
}
BEHAVIOUR_ONLY = (5, 6)  # the simulator's scenarios whose amounts and counts are the victim's own
# context 64 of max_len 128: 64 predictions per window forward (100 left 28 and doubled the behaviour pass)
FRAUD = {
    "delay_days": 7, "context": 64, "embedding_dims": 8, "threads": 1,
    "lgbm": {"learning_rate": 0.05, "max_rounds": 800, "early_stopping": 50},
}
MODEL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.max_len=128", "model.dropout=0.1",
         "model.field_embeddings=true", "model.time_gap=true"]
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"


def env() -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    if os.path.exists(TCMALLOC) and "tcmalloc" not in e.get("LD_PRELOAD", ""):
        e["LD_PRELOAD"] = TCMALLOC
    return e


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pantherseq.cli", *args]


def prepare(dataset: str, data: str | None, run: Path, split: dict, extra: list[str]) -> None:
    if (run / "prepare.json").is_file():
        done = json.loads((run / "prepare.json").read_text())["split"]
        if done.get("t1") == split["t1"] and done.get("t2") == split["t2"]:
            return
    cmd = cli("prepare", "--dataset", dataset, "--out", str(run),
              "--set", f"split.t1=\"{split['t1']}\"", "--set", f"split.t2=\"{split['t2']}\"")
    if data:
        cmd += ["--data", data]
    for item in extra:
        cmd += ["--set", item]
    subprocess.run(cmd, check=True, env=env())


def chain(run: Path, backbone: str, epochs: int, fraud_toml: Path, log: Path, reuse: bool = False
          ) -> subprocess.Popen:
    """pretrain then fraud for one backbone, in one shell, logging to `log`; `reuse`: a model already
    trained in `run` by this script is kept (only the fraud step runs)."""
    sets = [*MODEL, "train.threads=1", f"train.epochs={epochs}", "train.patience=2",
            "train.eval_max_users=300", "train.lr=0.002", "train.batch_size=64", "train.warmup_steps=10"]
    pretrain = cli("pretrain", "--run", str(run), "--model", backbone, *[a for s in sets for a in ("--set", s)])
    fraud = cli("fraud", "--run", str(run), "--model", backbone, "--config", str(fraud_toml))
    script = " ".join(map(_quote, fraud))
    if not (reuse and (run / "models" / backbone / "metrics.json").is_file()):
        script = " ".join(map(_quote, pretrain)) + " && " + script
    fh = open(log, "w")  # noqa: SIM115 (closed by the caller's wait)
    return subprocess.Popen(["bash", "-c", script], stdout=fh, stderr=subprocess.STDOUT, env=env())


def behaviour_only(run: Path, backbone: str) -> dict[str, float] | None:
    """recall@1% of every feature set on the frauds of the behaviour-only scenarios together (None: the data
    has none), from the scores the fraud step wrote."""
    import numpy as np
    import polars as pl

    from pantherseq.fraud.metrics import recall_at_top

    scores = pl.read_parquet(run / f"fraud-{backbone}" / "scores.parquet")
    if "scenario" not in scores.columns:
        return None
    subset = scores["scenario"].is_in(list(BEHAVIOUR_ONLY)).to_numpy()
    if not subset.any():
        return None
    y = scores["label"].to_numpy().astype(np.int8)
    return {c.removeprefix("score_"): recall_at_top(scores[c].to_numpy(), y, 1.0, subset)
            for c in scores.columns if c.startswith("score_")}


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=sorted(SETUPS), default="handbook")
    ap.add_argument("--data", help="default: ../shared/data/fraud-handbook for the handbook")
    ap.add_argument("--work", help="default: runs/fraud-<dataset>")
    ap.add_argument("--backbones", default="panther,transformer")
    ap.add_argument("--epochs", type=int, help="most pretraining epochs (early stopping, patience 2); "
                    "default 5 on the handbook, 8 on the simulator")
    ap.add_argument("--reuse-models", action="store_true",
                    help="keep the models an earlier run of this script trained in --work (only the fraud step runs)")
    ap.add_argument("--summarise", action="store_true",
                    help="rewrite --out from the outputs an earlier full run left in --work (runs nothing)")
    ap.add_argument("--prepare-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra prepare overrides (e.g. simulate.n_users=300 for a dry run)")
    ap.add_argument("--out", help="default: benchmarks/results/fraud.json (handbook), fraud-simulated.json")
    ap.add_argument("--embedding-dims", type=int, default=FRAUD["embedding_dims"],
                    help="PCA components kept of each user state (0 = dropped: the embedding ablation, -1 = all)")
    args = ap.parse_args()
    started = time.perf_counter()
    setup = SETUPS[args.dataset]
    split, periods = setup["split"], setup["fraud"]
    out = Path(args.out or setup["out"])
    data = args.data or (str(REPO.parent / "shared" / "data" / "fraud-handbook") if args.dataset == "handbook"
                         else None)
    work = Path(args.work or REPO / "runs" / f"fraud-{args.dataset}")
    work.mkdir(parents=True, exist_ok=True)
    run = work / args.dataset
    if not args.summarise:
        prepare(args.dataset, data, run, split, [*setup["prepare"], *args.prepare_set])
    backbones = [b for b in args.backbones.split(",") if b]
    results: dict = {"dataset": args.dataset, "split": (
        f"generative models: train < {split['t1']}, early stopping on {split['t1']}..{split['t2']}; risk model: "
        f"train {periods['train_start']}..{periods['train_end']} (exclusive), gap, test {periods['test_start']}.."
        f"{periods['test_end']} (exclusive)"), "backbones": {}, "merchant_risk_auc": {},
        "recall@1%_behaviour_only": {}, "details": {}}
    if args.summarise:  # the command and wall time stay those of the run that made the outputs
        earlier = json.loads(out.read_text())
        results["command"], results["wall_s"] = earlier["command"], earlier["wall_s"]
        for b in backbones:
            summarise(results, run, b)
        out.write_text(json.dumps(results, indent=1))
        return print_tables(results, backbones, out)
    for b in backbones:
        fraud_toml = work / f"fraud-{b}.toml"
        fraud_toml.write_text(tomli_w.dumps({**FRAUD, **periods, "embedding_dims": args.embedding_dims,
                                             "out_dir": str(run / f"fraud-{b}")}))
    epochs = args.epochs or setup["epochs"]
    procs = {b: chain(run, b, epochs, work / f"fraud-{b}.toml", work / f"{b}.log", args.reuse_models)
             for b in backbones}
    results["command"] = " ".join([".venv/bin/python", "benchmarks/fraud.py", *sys.argv[1:]])
    for b, proc in procs.items():  # results are written after each backbone, so a finished one is kept
        if proc.wait() != 0:
            raise SystemExit(f"{b} failed: see {work / (b + '.log')}")
        summarise(results, run, b)
        results["wall_s"] = round(time.perf_counter() - started, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    print_tables(results, backbones, out)


def summarise(results: dict, run: Path, b: str) -> None:
    """Backbone b's entries of the results from RUN/fraud-<b>/ (each backbone has its own out_dir)."""
    rep = json.loads((run / f"fraud-{b}" / "fraud.json").read_text())
    results["backbones"][b] = rep["feature_sets"]
    results["merchant_risk_auc"][b] = rep["merchant_risk"].get("roc_auc")
    results["recall@1%_behaviour_only"][b] = behaviour_only(run, b)
    pre = json.loads((run / "models" / b / "metrics.json").read_text())
    results["details"][b] = {"rows": rep["rows"], "timings_s": rep["timings_s"], "risk_models": rep["risk_models"],
                             "embedding": rep.get("embedding"), "merchant_risk": rep["merchant_risk"],
                             "pretrain": {k: pre[k] for k in ("epochs", "train_s", "steps", "n_params")}
                             | {"valid_ndcg@10": pre["valid"]["ndcg@10"], "valid_hr@10": pre["valid"]["hr@10"]}}


def print_tables(results: dict, backbones: list[str], out: Path) -> None:
    from pantherseq.fraud.pipeline import format_fraud_table

    for b in backbones:
        print(f"\n{b}:\n" + format_fraud_table({"feature_sets": results["backbones"][b],
                                               "embedding": results["details"][b]["embedding"],
                                               "merchant_risk": {"roc_auc": None}}))
        print(f"merchant risk ROC-AUC: {results['merchant_risk_auc'][b]}")
        if results["recall@1%_behaviour_only"].get(b):
            print("recall@1% on the behaviour-only scenarios " + ", ".join(
                f"{k} {v:.4f}" for k, v in results["recall@1%_behaviour_only"][b].items()))
    print(f"\n-> {out} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
