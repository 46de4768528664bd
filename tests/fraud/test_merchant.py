"""Merchant risk R_m: one vote per user, the quantile, robust statistics, the AUC."""

from __future__ import annotations

import math

import polars as pl
import pytest

from pantherseq.fraud.config import FraudConfig
from pantherseq.fraud.merchant import flagged_precision, merchant_auc, merchant_risk
from pantherseq.fraud.pipeline import _merchant_section


def test_merchant_risk_by_hand():
    frame = pl.DataFrame({
        "user_id": ["a", "a", "b", "c", "a", "b", "d", "e"],
        "merchant_id": ["m", "m", "m", "m", "n", "n", "o", "o"],
        "d": [1.0, 3.0, 4.0, 10.0, 5.0, float("nan"), 0.0, 1.0],
    })
    t = merchant_risk(frame, "merchant_id", "d", q=0.5, min_users=2).sort("merchant_id")
    m = t.row(0, named=True)
    # m: user a votes mean(1, 3) = 2, b 4, c 10 -> median 4; MAD = median(|2-4|, 0, 6) = 2
    assert (m["users"], m["payments"], m["risk"], m["median"], m["mad"]) == (3, 4, 4.0, 4.0, 2.0)
    n = t.row(1, named=True)
    assert n["users"] == 1 and n["risk"] is None  # b's NaN does not vote; one user is too few
    o = t.row(2, named=True)
    assert o["risk"] == pytest.approx(0.5)
    # robust z among rated merchants (4 and 0.5): centre 2.25, MAD 1.75 * 1.4826
    assert m["risk_z"] == pytest.approx((4 - 2.25) / (1.75 * 1.4826))


def test_merchant_auc_ranks_the_compromised_first():
    table = pl.DataFrame({"merchant_id": ["a", "b", "c", "d"], "risk": [3.0, 2.0, 1.0, None]})
    assert merchant_auc(table, "merchant_id", {"a"}) == 1.0
    assert merchant_auc(table, "merchant_id", {"c"}) == 0.0
    assert merchant_auc(table, "merchant_id", {"b", "d"}) == pytest.approx(0.5)  # d has no R_m: left out
    assert math.isnan(merchant_auc(table, "merchant_id", set()))


def test_flagged_precision_against_the_base_rate():
    table = pl.DataFrame({"merchant_id": ["a", "b", "c", "d", "e"], "risk": [9.0, 8.0, 1.0, 1.0, None],
                          "high_risk": [True, True, False, False, False]})
    assert flagged_precision(table, "merchant_id", {"a", "c"}) == {"flagged": 2, "flagged_precision": 0.5,
                                                                   "base_rate": 0.5}
    assert flagged_precision(table, "merchant_id", {"a", "b", "e"})["flagged_precision"] == 1.0
    none = flagged_precision(table.with_columns(pl.lit(False).alias("high_risk")), "merchant_id", {"a"})
    assert none["flagged"] == 0 and math.isnan(none["flagged_precision"]) and none["base_rate"] == 0.25


def test_merchant_risk_reads_the_merchant_heads_surprisal_when_the_merchant_is_no_token_field():
    rows = [(f"u{u}", m, 5.0 if m == "rogue" else 0.5, 0.1) for u in range(4) for m in ("rogue", "shop")]
    test = pl.DataFrame(rows, schema=["user_id", "merchant_id", "d_head_surprisal_merchant_id", "d_surprisal"],
                        orient="row")
    table, info = _merchant_section(test, "merchant_id", FraudConfig(), "simulated")
    assert info["delta"] == "d_head_surprisal_merchant_id"
    risk = dict(table.select("merchant_id", "risk").iter_rows())
    assert risk["rogue"] > risk["shop"]
