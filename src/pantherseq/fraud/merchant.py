"""Merchant risk (paper §4.1.3): R_m = quantile_q {Δ_{u,m} : u among the users who paid merchant m}.

    merchant_risk(frame, merchant, delta, q, min_users) -> one row per merchant
    merchant_auc(table, compromised) -> ROC-AUC of R_m against a ground-truth set of merchants
    flagged_precision(table, compromised) -> the share of `high_risk` merchants truly compromised, and the
                                          share among all rated merchants (the paper's 76 % vs 50 %)

Δ_{u,m} is the mean of user u's Δ over their payments at m in the window (one vote per user, so a busy
customer cannot dominate a merchant). The table keeps robust statistics beside R_m: the number of users
and payments, the median and the MAD of Δ_{u,m}, and `risk_z` = (R_m − median_m R) / (1.4826 · MAD_m R),
the merchant's robust z-score among all merchants; `high_risk` = risk_z > `z_threshold` is the simple
classifier of high-risk merchants. Merchants with fewer than `min_users` users get no R_m (null) and are
left out of the AUC: a quantile of two users says nothing. Δ that are NaN (UNK events for token-level Δ)
are ignored.

Ground truth on the handbook data: a terminal is compromised when any of its transactions in the window
is scenario-2 fraud. Scenario 2 does not change what the customers do (they pay at their usual terminal,
usual amounts), so a deviation-based R_m has nothing to see there; the AUC is reported to show that. On
the simulator: a merchant with any scenario-6 (rogue merchant) fraud, whose victims never paid there
before — what a per-user Δ_{u,m} of the merchant sees.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from pantherseq.data.schema import USER
from pantherseq.eval.metrics import roc_auc

MAD_SCALE = 1.4826  # MAD -> standard deviation under normality


def merchant_risk(frame: pl.DataFrame, merchant: str, delta: str, q: float = 0.9, min_users: int = 3,
                  z_threshold: float = 3.0) -> pl.DataFrame:
    """frame: one row per payment with `user_id`, `merchant` and the Δ column `delta`."""
    votes = (frame.select(USER, merchant, pl.col(delta).cast(pl.Float64).fill_nan(None).alias("d"))
             .drop_nulls("d")
             .group_by(merchant, USER).agg(pl.col("d").mean(), pl.len().alias("payments")))
    table = (votes.group_by(merchant).agg(
        pl.len().alias("users"),
        pl.col("payments").sum(),
        pl.col("d").quantile(q, interpolation="linear").alias("risk"),
        pl.col("d").median().alias("median"),
        (pl.col("d") - pl.col("d").median()).abs().median().alias("mad"),
    ).with_columns(pl.when(pl.col("users") >= min_users).then(pl.col("risk")).otherwise(None).alias("risk")))
    r = table["risk"].drop_nulls()
    center = float(r.median()) if len(r) else 0.0
    spread = float((r - center).abs().median()) * MAD_SCALE if len(r) else 1.0
    z = (pl.col("risk") - center) / (spread if spread > 0 else 1.0)
    return table.with_columns(z.alias("risk_z"), (z > z_threshold).fill_null(False).alias("high_risk")) \
        .sort("risk", descending=True, nulls_last=True)


def merchant_auc(table: pl.DataFrame, merchant: str, compromised: set) -> float:
    """ROC-AUC of R_m (merchants with an R_m) for the merchants in `compromised`."""
    rated = table.drop_nulls("risk")
    if rated.height == 0:
        return float("nan")
    truth = np.array([m in compromised for m in rated[merchant].to_list()], dtype=bool)
    return roc_auc(rated["risk"].to_numpy(), truth)


def flagged_precision(table: pl.DataFrame, merchant: str, compromised: set) -> dict[str, float | int]:
    """{flagged, flagged_precision, base_rate}: how many rated merchants are `high_risk`, the share of them
    in `compromised` (NaN when none is flagged), and the share of compromised among all rated merchants
    (what flagging at random would reach)."""
    rated = table.drop_nulls("risk")
    truth = np.array([m in compromised for m in rated[merchant].to_list()], dtype=bool)
    flagged = rated["high_risk"].to_numpy().astype(bool)
    return {"flagged": int(flagged.sum()),
            "flagged_precision": float(truth[flagged].mean()) if flagged.any() else float("nan"),
            "base_rate": float(truth.mean()) if len(truth) else float("nan")}
