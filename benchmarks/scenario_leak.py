"""Whether the simulator's behaviour-only scenarios (5 and 6) are behaviour-only: what a model that sees no
customer catches of them.

    .venv/bin/python benchmarks/scenario_leak.py [--users 4000] [--seed 0] [--out benchmarks/results/scenario_leak.json]

Simulates `--users` users (the fraud benchmark's simulator size, `SimulateConfig` defaults otherwise), then
per scenario s in 5, 6: LightGBM (200 rounds, defaults, one thread) on the event's hour, category, channel
and amount only — no customer, no history — fitted on a random half of the genuine and scenario-s events and
scored on the other half: ROC-AUC and recall at a 1 % alert rate. A scenario a user-blind model catches is
caught by population-level rules, not by a model of each customer. Beside it, per field, the mean share of
all genuine events that have the fraud's value (population share) and the mean share of the victim's own
earlier genuine events that have it (own share), for the fraud events and for the genuine events.
Deterministic for a seed (one thread).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightgbm as lgb
import numpy as np
import polars as pl

from pantherseq.data.schema import SimulateConfig
from pantherseq.data.simulate import simulate
from pantherseq.data.simulate_fraud import own_share, population_share, victims_history
from pantherseq.eval.metrics import roc_auc

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "scenario_leak.json"
FIELDS = ("hour", "category", "channel", "merchant_id")


def user_blind(ev: pl.DataFrame, scenario: int, seed: int) -> dict:
    """LightGBM on (hour, category, channel, amount) separating scenario `scenario` from genuine events."""
    part = ev.filter(pl.col("scenario").is_in([0, scenario]))
    X = part.select("hour", pl.col("category").cast(pl.Categorical).to_physical(),
                    pl.col("channel").cast(pl.Categorical).to_physical(), "amount").to_numpy().astype(float)
    y = (part["scenario"] == scenario).to_numpy().astype(int)
    order = np.random.default_rng(seed).permutation(len(y))
    fit, test = order[: len(y) // 2], order[len(y) // 2:]
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_threads": 1, "seed": seed},
                        lgb.Dataset(X[fit], y[fit], categorical_feature=[1, 2]), 200)
    p, yt = booster.predict(X[test]), y[test]
    top = np.argsort(-p, kind="stable")[: max(1, int(0.01 * len(p)))]
    return {"frauds": int(y.sum()), "test_frauds": int(yt.sum()), "roc_auc": round(float(roc_auc(p, yt)), 4),
            "recall@1%": round(float(yt[top].sum() / max(yt.sum(), 1)), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    started = time.perf_counter()
    ev = simulate(SimulateConfig(n_users=args.users, seed=args.seed)).events \
        .with_columns(hour=pl.col("timestamp").dt.hour())
    genuine = ev.filter(pl.col("scenario") == 0)
    out: dict = {"users": args.users, "seed": args.seed, "events": ev.height, "scenarios": {}}
    print(f"{'scenario':>8} {'frauds':>6} {'AUC':>6} {'rec@1%':>7}  " +
          "  ".join(f"{f + ' pop/own (fraud | genuine)':>44}" for f in FIELDS))
    for s in (5, 6):
        fraud = ev.filter(pl.col("scenario") == s)
        history = victims_history(genuine, fraud)
        res = user_blind(ev, s, args.seed)
        res["fields"] = {f: {"population_share": {"fraud": round(population_share(fraud, genuine, f), 4),
                                                  "genuine": round(population_share(genuine, genuine, f), 4)},
                             "own_share": {"fraud": round(own_share(fraud, history, f), 4),
                                           "genuine": round(own_share(history, history, f), 4)}}
                         for f in FIELDS}
        out["scenarios"][str(s)] = res
        cells = [f"{v['population_share']['fraud']:.3f}/{v['own_share']['fraud']:.3f} | "
                 f"{v['population_share']['genuine']:.3f}/{v['own_share']['genuine']:.3f}"
                 for v in res["fields"].values()]
        print(f"{s:>8} {res['frauds']:>6} {res['roc_auc']:>6.3f} {res['recall@1%']:>7.3f}  " +
              "  ".join(f"{c:>44}" for c in cells))
    out["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
