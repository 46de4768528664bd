"""User transfer and data efficiency (issue 16; the paper's Table 7 transfer and Table 8 pretrain-then-fine-tune).

    .venv/bin/python benchmarks/transfer.py --dataset simulated          # <= 30 min on a 2-core machine
    .venv/bin/python benchmarks/transfer.py --dataset handbook           # optional, the larger one
    .venv/bin/python benchmarks/transfer.py --dataset simulated --quick  # smoke run (600 users), writes nothing

Protocol. The users are split 80 / 20 by `prepare`'s seeded user subset (`users.fraction = 0.8`, BLAKE2b of the
user id, docs/DATA.md): the 80 % run fits the tokenizer, the 20 % run re-uses it (`--tokenizer-from`), so the
three models below rank the same targets over the same vocabulary and a model of the 80 % run loads into the
20 % run as it is. Each run keeps the dataset's own time split (train / valid / test periods). On the 20 %
users' test events (every test event predicted from all earlier events of its user; full ranking; UNK
targets excluded) `pantherseq evaluate` measures HR@10 and NDCG@10 of
- cold_start (a): PANTHER trained from scratch on the 20 % users' training period only;
- transfer (b): PANTHER pretrained on the 80 % users, applied as it is (`pretrain --init-from` with 0 epochs:
  the warm start's same-tokenizer path, every weight loaded, recorded in its metrics.json);
- fine_tuned (c): (b) fine-tuned on the 20 % users' training period (`--init-from`).
Data efficiency: scratch vs fine-tuned on a seeded share (5 %, 25 %, 100 %) of the 20 % users' training windows
(`train.data_fraction`: the same windows for both, each with its whole context; the 100 % pair is (a) and (c)).
Every model is `panther` with the default inputs and heads (field embeddings, time gap, copy head, field
heads) and the sizes of benchmarks/nextevent.py; training is budgeted in epochs with early stopping on
validation NDCG@10 (best epoch kept); the target side, with a fifth of the data, trains in smaller batches
with more patience (DATASETS). Target-side models are trained once per seed and averaged. Reported:
HR@10, NDCG@10 and the repeat / explore HR@10 (targets already in the user's history, or not).
Targets (issue 16): transfer HR@10 >= 1.2 x cold start, fine-tuned >= transfer; at 5 %, fine-tuned HR@10
>= 1.2 x scratch. Writes benchmarks/results/transfer.json (the other datasets' blocks are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nextevent import PY, REPO, sh

RESULTS = REPO / "benchmarks" / "results" / "transfer.json"
FRACTIONS = (0.05, 0.25, 1.0)
METRICS = ("hr@10", "ndcg@10", "repeat_hr@10", "explore_hr@10")  # repeat / explore: target seen before or not
MODEL = "panther"
DATASETS = {
    "simulated": {
        "prepare": ["--dataset", "simulated"], "quick_prepare": ["--set", "simulate.n_users=600"],
        "sets": ["model.max_len=64", "train.eval_max_users=500"],
        # the 400 target users hold ~1,400 training windows: batches of 32 (44 steps an epoch at 100 %) and a
        # patience of 4, as batches of 128 stopped cold start after 33 steps, before it learnt anything but
        # to copy (explore HR@10 0.000; a first full run, not recorded)
        "pretrain_sets": ["train.batch_size=128", "train.patience=2"],
        "target_sets": ["train.batch_size=32", "train.patience=4"],
        "pretrain_epochs": (6, 1), "target_epochs": (20, 1), "seeds": (0, 1),
        "protocol": "built-in simulator (2,000 users, 120 days), time split t1 = 2024-03-21, t2 = 2024-04-10",
    },
    "handbook": {
        "prepare": ["--dataset", "handbook", "--data", "{data}/fraud-handbook"],
        "quick_prepare": ["--data", "{data}/fraud-handbook/transactions_customers_0000-0624.csv.gz"],
        "sets": ["model.max_len=64", "model.loss=\"sampled\"", "train.batch_size=128", "train.eval_max_users=400"],
        "pretrain_sets": ["train.patience=1"], "target_sets": ["train.patience=2"],
        "pretrain_epochs": (2, 1), "target_epochs": (6, 1), "seeds": (0,),
        "protocol": "Fraud Detection Handbook (4,990 customers), train < 2018-08-01, valid August, test September",
    },
}


def prepare(spec: dict, run: Path, data: str, quick: bool, seed: int, extra: list[str]) -> dict:
    args = [a.format(data=data) for a in spec["prepare"]]
    if quick:
        args = [*args, *[a.format(data=data) for a in spec["quick_prepare"]]]
        if "--data" in spec["quick_prepare"]:  # the quick file replaces the full folder
            i = args.index("--data")
            args = args[:i] + args[i + 2:]
    sh([PY, "-m", "pantherseq.cli", "prepare", *args, "--set", "users.fraction=0.8", "--set", f"users.seed={seed}",
        *extra, "--out", str(run), "--force"])
    return json.loads((run / "prepare.json").read_text())


def pretrain(run: Path, name: str, sets: list[str], init_from: Path | None = None) -> dict:
    """One `pantherseq pretrain` in its own process; its metrics.json."""
    cmd = [PY, "-m", "pantherseq.cli", "pretrain", "--run", str(run), "--name", name]
    cmd += ["--init-from", str(init_from)] if init_from else ["--model", MODEL]
    for s in sets:
        cmd += ["--set", s]
    sh(cmd)
    return json.loads((run / "models" / name / "metrics.json").read_text())


def evaluate(run: Path, names: list[str]) -> dict:
    sh([PY, "-m", "pantherseq.cli", "evaluate", "--run", str(run), "--models", ",".join(names), "--split", "test"])
    return json.loads((run / "eval.json").read_text())


def train_all(spec: dict, pre: Path, target: Path, quick: bool, threads: int | None) -> dict[str, list]:
    """Train every model; {row: [(model name, metrics), ...] one per seed}."""
    q = 1 if quick else 0
    common = [*spec["sets"], *([f"train.threads={threads}"] if threads else [])]
    seeds = spec["seeds"][:1] if quick else spec["seeds"]
    pretrain(pre, MODEL, [*common, *spec["pretrain_sets"], f"train.epochs={spec['pretrain_epochs'][q]}", "train.seed=0"])
    source = pre / "models" / MODEL
    common += spec["target_sets"]
    rows: dict[str, list] = {"transfer": [("transfer", pretrain(target, "transfer", [*common, "train.epochs=0"],
                                                                 source))]}
    for seed in seeds:
        for fraction in FRACTIONS:
            sets = [*common, f"train.epochs={spec['target_epochs'][q]}", f"train.seed={seed}",
                    f"train.data_fraction={fraction}"]
            for kind, init in (("scratch", None), ("fine_tuned", source)):
                name = f"{kind}_f{fraction:g}_s{seed}"
                rows.setdefault(f"{kind}@{fraction:g}", []).append((name, pretrain(target, name, sets, init)))
    rows["cold_start"], rows["fine_tuned"] = rows["scratch@1"], rows["fine_tuned@1"]
    return rows


def summarise(rows: dict[str, list], results: dict) -> dict[str, dict]:
    """Per row: mean HR@10 / NDCG@10 over seeds, the per-seed values and the epochs trained."""
    out = {}
    for row, runs in rows.items():
        tests = [results[name]["test"] for name, _ in runs]
        out[row] = {k: round(statistics.fmean(t[k] for t in tests), 4) for k in METRICS}
        out[row] |= {
                     "hr@10_by_seed": [round(t["hr@10"], 4) for t in tests], "n": tests[0]["n"],
                     "repeat_n": tests[0]["repeat_n"], "explore_n": tests[0]["explore_n"],
                     "epochs": [m["epochs"] for _, m in runs], "train_s": [m["train_s"] for _, m in runs]}
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def bench(name: str, work: Path, data: str, quick: bool, threads: int | None, seed: int) -> dict:
    spec = DATASETS[name]
    pre, target = work / f"{name}-pretrain", work / f"{name}-target"
    p80 = prepare(spec, pre, data, quick, seed, [])
    p20 = prepare(spec, target, data, quick, seed, ["--set", "users.complement=true", "--tokenizer-from", str(pre)])
    rows = train_all(spec, pre, target, quick, threads)
    s = summarise(rows, evaluate(target, sorted({n for runs in rows.values() for n, _ in runs})))
    cold, transfer, tuned = s["cold_start"], s["transfer"], s["fine_tuned"]
    efficiency = {f"{f:g}": {"scratch": s[f"scratch@{f:g}"], "fine_tuned": s[f"fine_tuned@{f:g}"]} for f in FRACTIONS}
    low = efficiency[f"{FRACTIONS[0]:g}"]
    q = 1 if quick else 0
    return {
        "users_pretrain": p80["users"], "users_target": p20["users"],
        "cold_start": cold, "transfer": transfer, "fine_tuned": tuned, "data_efficiency": efficiency,
        "targets": {
            "transfer_over_cold_start": _ratio(transfer["hr@10"], cold["hr@10"]),
            "transfer_met": transfer["hr@10"] >= 1.2 * cold["hr@10"],
            "fine_tuned_ge_transfer": tuned["hr@10"] >= transfer["hr@10"],
            "fine_tuned_over_scratch_at_5pct": _ratio(low["fine_tuned"]["hr@10"], low["scratch"]["hr@10"]),
            "efficiency_met": low["fine_tuned"]["hr@10"] >= 1.2 * low["scratch"]["hr@10"],
        },
        "protocol": spec["protocol"], "model": MODEL, "user_split_seed": seed,
        "seeds": list(spec["seeds"][:1] if quick else spec["seeds"]),
        "overrides": {"pretrain": [*spec["sets"], *spec["pretrain_sets"]], "target": [*spec["sets"], *spec["target_sets"]]},
        "max_epochs": {"pretrain": spec["pretrain_epochs"][q], "target": spec["target_epochs"][q]},
        "early_stopping": "validation NDCG@10",
        "events_pretrain": p80["rows_kept"], "events_target": p20["rows_kept"],
        "target_coverage": p20["coverage"], "threads": threads,
    }


def print_table(name: str, block: dict) -> None:
    print(f"\n{name}: {block['users_pretrain']:,} pretraining users, {block['users_target']:,} target users "
          f"(test n = {block['cold_start']['n']:,}); seeds {block['seeds']}")
    print(f"{'model':<24}" + "".join(f"{m:>15}" for m in METRICS) + "  epochs")
    for row in ("cold_start", "transfer", "fine_tuned"):
        r = block[row]
        print(f"{row:<24}" + "".join(f"{r[m]:>15.4f}" for m in METRICS) + f"  {r['epochs']}")
    print(f"\n{'training events':<24}{'scratch':>9}{'tuned':>9}  ratio")
    for f, r in block["data_efficiency"].items():
        a, b = r["scratch"]["hr@10"], r["fine_tuned"]["hr@10"]
        print(f"{float(f):<24.0%}{a:>9.4f}{b:>9.4f}  {_ratio(b, a)}")
    print(f"\ntargets: {json.dumps(block['targets'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=list(DATASETS))
    parser.add_argument("--quick", action="store_true", help="fewer users, one epoch, one seed; writes nothing")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per training (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the 80 / 20 user split (default: 0)")
    parser.add_argument("--data", default=os.environ.get("PANTHERSEQ_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--work", default=None, help="run directories (default: runs/bench-transfer[-quick])")
    args = parser.parse_args()
    work = Path(args.work or REPO / "runs" / ("bench-transfer-quick" if args.quick else "bench-transfer"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    block = bench(args.dataset, work, args.data, args.quick, args.threads, args.seed)
    block["wall_s"] = round(time.time() - started)
    print_table(args.dataset, block)
    if args.quick:
        print(f"\n--quick: nothing written ({block['wall_s']} s)")
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[args.dataset] = block
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {RESULTS} [{args.dataset}] ({block['wall_s']} s)")


if __name__ == "__main__":
    main()
