"""Why merchant risk is hard to measure on the simulator (issue 13): merchant statistics over the test period's
fraud features, each scored by ROC-AUC against the rogue merchants (scenario 6), as docs/FRAUD.md quotes.

    .venv/bin/pantherseq fraud --run runs/fraud-simulated/simulated --model panther \\
        --config runs/fraud-simulated/fraud-panther.toml --set save_features=true \\
        --set 'feature_sets=["baseline+deviation"]' --set out_dir=runs/fraud-simulated/features-panther
    .venv/bin/python benchmarks/merchant_stats.py [--features runs/fraud-simulated/features-panther/features.parquet]

The first command is `benchmarks/fraud.py --dataset simulated`'s PANTHER fraud step with the features kept
(one feature set: the features do not depend on it). Per (customer, merchant) pair of the test period:
the customer's mean merchant surprisal there (`d_head_surprisal_merchant_id`, what `pantherseq fraud`'s
R_m reads) and whether it is a first visit (`d_seen_merchant_id` = 0). Per merchant with >= 3 customers:
- quantile_0.9: the paper's R_m (fraud/merchant.py `merchant_risk`, the default);
- above_T: how many customers are above T nats;
- excess_T: the Poisson excess of those customers over the merchant's size, (k - n p) / sqrt(n p), p the
  share of all pairs above T;
- window7_T: excess_T's maximum over 7-day windows (a rogue merchant charges for 4-8 days).
Writes benchmarks/results/merchant_stats.json.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl

from pantherseq.eval.metrics import roc_auc
from pantherseq.fraud.merchant import merchant_risk

REPO = Path(__file__).resolve().parents[1]
MERCHANT, SURPRISAL, SEEN = "merchant_id", "d_head_surprisal_merchant_id", "d_seen_merchant_id"
ROGUE = 6  # the simulator's rogue-merchant scenario
THRESHOLDS = (8.0, 9.0, 10.0)
MIN_USERS = 3


def excess(pairs: pl.DataFrame, threshold: float) -> pl.DataFrame:
    """Per merchant: (k - n p) / sqrt(n p), k of its n customers above `threshold`, p the share of all pairs."""
    p = float((pairs["d"] > threshold).mean())
    return pairs.group_by(MERCHANT).agg(pl.len().alias("n"), (pl.col("d") > threshold).sum().alias("k")) \
        .with_columns(((pl.col("k") - pl.col("n") * p) / (pl.col("n") * p).sqrt()).alias("z"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", default=str(REPO / "runs/fraud-simulated/features-panther/features.parquet"))
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/merchant_stats.json"))
    args = ap.parse_args()
    test = pl.read_parquet(args.features).filter(pl.col("period") == "test")
    rogue = set(test.filter(pl.col("scenario") == ROGUE)[MERCHANT].unique().to_list())
    pairs = test.group_by(MERCHANT, "user_id").agg(
        pl.col(SURPRISAL).mean().alias("d"), (pl.col("scenario").max() == ROGUE).alias("victim"),
        (pl.col(SEEN).min() == 0).alias("first_visit"), pl.col("timestamp").min().alias("t0"))
    rated = pairs.group_by(MERCHANT).agg(pl.len().alias("users")).filter(pl.col("users") >= MIN_USERS)
    ids = rated[MERCHANT].to_list()
    truth = np.array([m in rogue for m in ids])

    def auc(values: dict) -> float:
        return round(roc_auc(np.array([values.get(m, 0.0) for m in ids], float), truth), 4)

    table = merchant_risk(test, MERCHANT, SURPRISAL, 0.9, MIN_USERS)
    stats = {"quantile_0.9": auc(dict(zip(table[MERCHANT].to_list(), table["risk"].to_list())))}
    day0 = pairs["t0"].min().replace(hour=0, minute=0, second=0, microsecond=0)
    days = (pairs["t0"].max() - day0).days + 1
    for t in THRESHOLDS:
        above = pairs.group_by(MERCHANT).agg((pl.col("d") > t).sum().alias("k"))
        stats[f"above_{t:g}"] = auc(dict(above.iter_rows()))
        stats[f"excess_{t:g}"] = auc(dict(excess(pairs, t).select(MERCHANT, "z").iter_rows()))
        best: dict[str, float] = {}
        for start in range(max(1, days - 6)):
            a = day0 + timedelta(days=start)
            window = pairs.filter((pl.col("t0") >= a) & (pl.col("t0") < a + timedelta(days=7)))
            for m, z in excess(window, t).select(MERCHANT, "z").iter_rows():
                best[m] = max(best.get(m, -np.inf), z)
        stats[f"window7_{t:g}"] = auc(best)
    victims, genuine = pairs.filter(pl.col("victim"))["d"], pairs.filter(~pl.col("victim"))["d"]
    sizes = rated.filter(pl.col(MERCHANT).is_in(list(rogue)))["users"]
    out = {
        "features": os.path.relpath(args.features, REPO), "merchants_rated": len(ids), "rogue_rated": int(truth.sum()),
        "rogue_customers": [int(sizes.min()), int(sizes.max())] if len(sizes) else None,
        "victim_pairs": victims.len(), "first_visit_share": round(float(pairs["first_visit"].mean()), 3),
        "victim_surprisal_median": round(float(victims.median()), 2),
        "victim_surprisal_q10": round(float(victims.quantile(0.1)), 2),
        "genuine_surprisal_median": round(float(genuine.median()), 2),
        "genuine_surprisal_q90": round(float(genuine.quantile(0.9)), 2),
        "genuine_above_9_per_merchant": round(float((pairs.filter(~pl.col("victim"))["d"] > 9).sum() / len(ids)), 1),
        "auc": stats,
        "command": ".venv/bin/python benchmarks/merchant_stats.py --features "
                   + os.path.relpath(args.features, REPO),
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "auc"}, indent=1))
    print(f"{'statistic':<16}{'ROC-AUC':>8}")
    for k, v in stats.items():
        print(f"{k:<16}{v:>8.4f}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
