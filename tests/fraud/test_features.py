"""Baseline features by hand, and leakage: changing the future leaves every past feature unchanged."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest

from pantherseq.fraud.features import (
    TerminalHistory,
    amount_units,
    baseline_features,
    context_features,
    context_one,
    customer_features,
    customer_one,
    robust_features,
    robust_one,
    terminal_features,
    window_sums,
)

T0 = dt.datetime(2024, 1, 1)


def frame(rows: list[tuple]) -> pl.DataFrame:
    """rows: (user, days after T0, amount, terminal, label)."""
    return pl.DataFrame({
        "user_id": [r[0] for r in rows],
        "timestamp": [T0 + dt.timedelta(days=r[1]) for r in rows],
        "amount": [float(r[2]) for r in rows],
        "terminal_id": [r[3] for r in rows],
        "label": pl.Series([r[4] for r in rows], dtype=pl.Int8),
    })


def test_customer_windows_by_hand():
    f = frame([("a", 0, 10, "t", 0), ("a", 0.5, 20, "t", 0), ("a", 2, 30, "t", 0), ("a", 10, 40, "t", 0),
               ("b", 0.25, 99, "t", 0)])
    c = customer_features(f, "amount", (1, 7))
    assert c["cust_n_1d"].to_list() == [1, 2, 1, 1, 1]
    assert c["cust_mean_amount_1d"].to_list() == [10, 15, 30, 40, 99]
    assert c["cust_n_7d"].to_list() == [1, 2, 3, 1, 1]
    assert c["cust_mean_amount_7d"].to_list() == [10, 15, 20, 40, 99]


def test_a_row_never_sees_a_later_row_with_the_same_timestamp():
    f = frame([("a", 1, 10, "t", 0), ("a", 1, 30, "t", 0)])
    c = customer_features(f, "amount", (1,))
    assert c["cust_n_1d"].to_list() == [1, 2] and c["cust_mean_amount_1d"].to_list() == [10, 20]


def test_terminal_windows_are_lagged_by_the_delay():
    # terminal t: frauds on days 0 and 1, genuine on day 2; scored on days 3, 8 and 9 with delay 7
    f = frame([("a", 0, 1, "t", 1), ("b", 1, 1, "t", 1), ("c", 2, 1, "t", 0), ("d", 3, 1, "t", 0),
               ("e", 8, 1, "t", 0), ("f", 9, 1, "t", 0), ("g", 8.5, 1, "u", 1)])
    t = terminal_features(f, "terminal_id", (1, 7), delay_days=7)
    # day 3: (−5, −4] and (−11, −4]: nothing is 7 days old yet
    assert t["term_n_7d"][3] == 0 and t["term_frauds_7d"][3] == 0
    # day 8: window (0, 1] -> the day-1 fraud (day 0 is not inside (0, 1]); 7d window (−6, 1] -> both frauds
    assert t["term_frauds_1d"][4] == 1 and t["term_n_1d"][4] == 1
    assert t["term_frauds_7d"][4] == 2 and t["term_n_7d"][4] == 2 and t["term_rate_7d"][4] == 1.0
    # day 9: (1, 2] -> the genuine day-2 row; (−5, 2] -> 2 frauds of 3
    assert t["term_n_1d"][5] == 1 and t["term_frauds_1d"][5] == 0
    assert t["term_rate_7d"][5] == pytest.approx(2 / 3)
    assert t["term_n_7d"][6] == 0  # another terminal


def test_window_sums_matches_a_loop():
    rng = np.random.default_rng(0)
    n = 300
    g, t, v = rng.integers(0, 5, n), rng.integers(0, 50, n), rng.integers(-10**12, 10**12, n)
    for lag in (0, 7):
        got = window_sums(g, t, v, 10, lag)
        order = np.lexsort((np.arange(n), t, g))
        rank = np.empty(n, int)
        rank[order] = np.arange(n)
        for i in range(n):
            m = (g == g[i]) & (t > t[i] - lag - 10) & (t <= t[i] - lag)
            if lag == 0:
                m &= rank <= rank[i]
            assert got[i] == v[m].sum()  # integer sums: exact


def random_events(rng, n: int) -> pl.DataFrame:
    days = np.sort(rng.uniform(0, 60, n))
    return frame([(f"u{rng.integers(0, 8)}", d, rng.uniform(1, 300), f"t{rng.integers(0, 5)}",
                   int(rng.random() < 0.1)) for d in days])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_changing_the_future_leaves_past_features_unchanged(seed):
    rng = np.random.default_rng(seed)
    events = random_events(rng, 400).with_columns(pl.Series("channel", rng.choice(["a", "b"], 400)))
    cut = T0 + dt.timedelta(days=35)
    past = events.filter(pl.col("timestamp") < cut)
    future = events.filter(pl.col("timestamp") >= cut)
    # a different future: labels flipped, amounts shuffled, terminals and users reassigned, rows dropped, added
    other = future.sample(fraction=0.7, seed=seed).with_columns(
        (1 - pl.col("label")).cast(pl.Int8).alias("label"), pl.col("amount").shuffle(seed=seed),
        pl.col("terminal_id").shuffle(seed=seed + 1), pl.col("user_id").shuffle(seed=seed + 2))
    extra = random_events(rng, 50).with_columns(pl.col("timestamp") + dt.timedelta(days=40),
                                                pl.Series("channel", rng.choice(["a", "b"], 50)))
    changed = pl.concat([past, other, extra]).sample(fraction=1.0, shuffle=True, seed=seed)  # any row order
    def features(ev: pl.DataFrame) -> pl.DataFrame:
        codes = {"channel": ev["channel"].replace_strict({"a": 1, "b": 2}, default=0).to_numpy()}
        base = baseline_features(ev, "amount", "terminal_id", codes)
        return pl.concat([ev, base.select(pl.all().name.prefix("f_"))], how="horizontal", strict=True)

    a, b = features(events), features(changed)
    key = ["user_id", "timestamp", "amount"]
    a_past = a.filter(pl.col("timestamp") < cut).sort(key)
    b_past = b.filter(pl.col("timestamp") < cut).sort(key)
    assert a_past.height == past.height and a_past.equals(b_past)


def test_one_event_forms_equal_the_batch_forms_bit_for_bit():
    """The service's one-event forms against the batch forms on random events with cent amounts, same
    timestamps and late frauds: every feature the same float32 (integer sums, one rounding)."""
    rng = np.random.default_rng(7)
    n = 600
    days = np.sort(rng.uniform(0, 60, n))
    amounts = np.round(rng.lognormal(3, 1.5, n), 2)
    ev = frame([(f"u{rng.integers(0, 6)}", d, a, f"t{rng.integers(0, 4)}", int(rng.random() < 0.15))
                for d, a in zip(days, amounts)])
    ev = ev.with_columns(pl.col("timestamp").dt.truncate("1m"))  # ties within a minute
    base = pl.concat([context_features(ev, "amount"), customer_features(ev, "amount"),
                      terminal_features(ev, "terminal_id", delay_days=7)], how="horizontal", strict=True)
    secs = (ev["timestamp"].dt.epoch("us").to_numpy() // 1_000_000).astype(np.int64)
    terms = TerminalHistory(delay_days=7)
    terms.load(ev["terminal_id"].to_numpy(), secs, ev["label"].to_numpy())
    users = ev["user_id"].to_numpy()
    for i in range(n):
        earlier = np.flatnonzero((users == users[i]) & (np.arange(n) < i))
        one = context_one(ev["timestamp"][i], float(ev["amount"][i]))
        one |= customer_one(secs[earlier], ev["amount"].to_numpy()[earlier], int(secs[i]), float(ev["amount"][i]))
        one |= terms.features(ev["terminal_id"][i], int(secs[i]))
        row = base.row(i, named=True)
        assert {k: np.float32(v) for k, v in one.items()} == {k: np.float32(row[k]) for k in one}, i


def test_robust_deviation_by_hand():
    """Past median and IQR of the customer's own earlier events; no history -> NaN and a count of 0."""
    ev = frame([("a", 0, 10, "t", 0), ("a", 1, 30, "t", 0), ("a", 2, 20, "t", 0), ("a", 3, 40, "t", 0),
                ("a", 4, 1000, "t", 1), ("a", 5, 25, "t", 0), ("b", 5, 7, "t", 0), ("a", 40, 50, "t", 0)])
    rz = robust_features(ev, "amount", days=30)
    assert rz["rz_n"].to_list() == [0, 1, 2, 3, 4, 5, 0, 0]
    assert np.isnan(rz["rz_z"][0]) and np.isnan(rz["rz_median"][6]) and np.isnan(rz["rz_ratio"][7])
    # row 1: past {10}: median 10, IQR 0 -> scale = median / 10 = 1
    assert rz.row(1) == (1.0, 10.0, 20.0, 3.0)
    # row 4: past {10, 20, 30, 40}: median 25, q25 17.5, q75 32.5, IQR 15
    assert rz.row(4) == (4.0, 25.0, np.float32((1000 - 25) / 15), 40.0)
    # row 5: past {10, 20, 30, 40, 1000}: the fraud moves the median to 30 only (a mean would be 220)
    assert rz["rz_median"][5] == 30.0 and rz["rz_z"][5] == np.float32((25 - 30) / 20)


def test_robust_one_event_form_equals_the_batch_form_bit_for_bit():
    """Random customers with ties in time: the one-event form on each event's earlier events gives the
    batch form's float32 values exactly, whatever the row order of the frame."""
    rng = np.random.default_rng(11)
    n = 500
    ev = frame([(f"u{rng.integers(0, 5)}", d, a, "t", 0) for d, a in
                zip(np.sort(rng.uniform(0, 90, n)), np.round(rng.lognormal(3, 1.2, n), 2))])
    perm = rng.permutation(n)  # distinct times: the features of an event do not depend on the row order
    assert robust_features(ev[perm], "amount", days=30).equals(robust_features(ev, "amount", days=30)[perm])
    ev = ev.with_columns(pl.col("timestamp").dt.truncate("1h"))  # ties: the earlier row is the past
    rz = robust_features(ev, "amount", days=30, chunk=64)
    secs = (ev["timestamp"].dt.epoch("us").to_numpy() // 1_000_000).astype(np.int64)
    users, amounts = ev["user_id"].to_numpy(), ev["amount"].to_numpy()
    for i in range(n):
        earlier = np.flatnonzero((users == users[i]) & (np.arange(n) < i))
        one = robust_one(secs[earlier], amounts[earlier], int(secs[i]), float(amounts[i]), days=30)
        row = rz.row(i, named=True)
        assert np.array_equal(np.float32(list(one.values())), np.float32([row[k] for k in one]),
                              equal_nan=True), i


def test_amount_units_are_exact_integers():
    assert amount_units(np.array([0.1, 0.2, 12.345678, 1e9])).tolist() == [1000, 2000, 123457, 10**13]
