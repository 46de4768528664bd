"""Hand-made fraud features (SPEC §7 baseline, the Fraud Detection Handbook's standard set), causal by construction.

    context_features(events, amount, categorical)   ψ: amount, hour, weekend, night (+ low-cardinality fields)
    customer_features(events, amount, windows)      per customer: count and mean amount over 1/7/30 days
    terminal_features(events, merchant, windows, delay)
                                                    per terminal: transactions, frauds and fraud rate over
                                                    1/7/30 days *ending `delay` days ago* (labels are only
                                                    known after the delay)
    baseline_features(events, ...)                  all of the above, one row per event, in input order

`events` is a run's `events.parquet` (or any frame with `user_id`, `timestamp`, the amount and merchant
fields and `label`); the output rows are aligned with its rows.

Windows are computed with cumulative sums and binary search over a sorted (group, time, row) key rather
than Polars `rolling`: a rolling window (t − w, t] also includes the rows that share the current
timestamp but come *after* it, which is a (small) look into the future. Here a customer window holds the
rows of the customer with time in (t − w, t] that come at or before the current row in time order (the
current transaction included: its amount is known at decision time), and a terminal window holds the
rows with time in (t − delay − w, t − delay], all of which are at least `delay` old, so their labels are
known. No feature reads a label of a transaction less than `delay` old, or any later event (tested by
changing the future and checking the past is unchanged).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from pantherseq.data.schema import LABEL, TIME, USER

DAY = 86_400
WINDOWS = (1, 7, 30)


def _seconds(events: pl.DataFrame) -> np.ndarray:
    return (events[TIME].dt.epoch("us").to_numpy() // 1_000_000).astype(np.int64)


def _codes(col: pl.Series) -> np.ndarray:
    """Dense integer codes of a column, only to group equal values (nulls get their own code)."""
    return col.cast(pl.Utf8).fill_null("\0null").rank("dense").to_numpy().astype(np.int64)


def window_sums(group: np.ndarray, t: np.ndarray, values: np.ndarray, width: int, lag: int = 0
                ) -> np.ndarray:
    """For each row i: Σ values[j] over rows j of the same group with t_i − lag − width < t_j ≤ t_i − lag.

    With lag = 0 only rows at or before row i in (time, row) order count, so a row never sees a later row
    with the same timestamp. Vectorised: one sort, a cumulative sum and two binary searches.
    values: (N,) or (N, C) -> the same shape, float64.
    """
    n = len(t)
    vals = np.asarray(values, dtype=np.float64).reshape(n, -1)
    if n == 0:
        return vals.reshape(np.shape(values)).astype(np.float64)
    order = np.lexsort((np.arange(n), t, group))
    span = int(lag + width + 1)
    trel = t - t.min() + span  # >= span, so key - offset stays inside the group
    big = int(trel.max()) + span + 1
    key = group[order].astype(np.int64) * big + trel[order]
    cum = np.vstack([np.zeros((1, vals.shape[1])), np.cumsum(vals[order], axis=0)])
    pos = np.arange(n)
    hi = pos + 1 if lag == 0 else np.searchsorted(key, key - lag, side="right")
    lo = np.searchsorted(key, key - lag - width, side="right")
    out = np.empty_like(vals)
    out[order] = cum[hi] - cum[lo]
    return out.reshape(np.shape(values)) if np.ndim(values) == 1 else out


def context_features(events: pl.DataFrame, amount: str, categorical: dict[str, np.ndarray] | None = None
                     ) -> pl.DataFrame:
    """ψ: amount, hour (fractional), weekend, night (00:00-06:00) and `ctx_<field>` for each categorical
    field, from codes given by the caller (the tokenizer's, fitted on the training period, so a value first
    seen later never renumbers the others)."""
    ts = pl.col(TIME)
    exprs = [
        pl.col(amount).cast(pl.Float64).alias("amount"),
        (ts.dt.hour() + ts.dt.minute() / 60.0).cast(pl.Float32).alias("hour"),
        (ts.dt.weekday() >= 6).cast(pl.Int8).alias("weekend"),
        (ts.dt.hour() < 6).cast(pl.Int8).alias("night"),
    ]
    out = events.select(exprs)
    for name, codes in (categorical or {}).items():
        out = out.with_columns(pl.Series(f"ctx_{name}", np.asarray(codes), dtype=pl.Int32))
    return out


def customer_features(events: pl.DataFrame, amount: str, windows: tuple[int, ...] = WINDOWS) -> pl.DataFrame:
    """Per customer, over (t − w days, t], current transaction included: count and mean amount."""
    user, t = _codes(events[USER]), _seconds(events)
    amt = events[amount].cast(pl.Float64).fill_null(0.0).to_numpy()
    cols = {}
    for w in windows:
        s = window_sums(user, t, np.stack([np.ones_like(amt), amt], 1), w * DAY)
        cols[f"cust_n_{w}d"] = s[:, 0].astype(np.float32)
        cols[f"cust_mean_amount_{w}d"] = (s[:, 1] / np.maximum(s[:, 0], 1.0)).astype(np.float32)
    return pl.DataFrame(cols)


def terminal_features(events: pl.DataFrame, merchant: str, windows: tuple[int, ...] = WINDOWS,
                      delay_days: int = 7) -> pl.DataFrame:
    """Per terminal / merchant, over (t − delay − w, t − delay]: transactions, frauds and the fraud rate.
    Unknown labels (null or -1) count as transactions, not as frauds."""
    term, t = _codes(events[merchant]), _seconds(events)
    label = (events[LABEL].fill_null(0).cast(pl.Int64).to_numpy() == 1).astype(np.float64) \
        if LABEL in events.columns else np.zeros(events.height)
    cols = {}
    for w in windows:
        s = window_sums(term, t, np.stack([np.ones_like(label), label], 1), w * DAY, lag=delay_days * DAY)
        cols[f"term_n_{w}d"] = s[:, 0].astype(np.float32)
        cols[f"term_frauds_{w}d"] = s[:, 1].astype(np.float32)
        cols[f"term_rate_{w}d"] = (s[:, 1] / np.maximum(s[:, 0], 1.0)).astype(np.float32)
    return pl.DataFrame(cols)


def auto_categorical(fields: list[str], sizes: list[int], max_values: int = 50) -> list[str]:
    """The fields with at most `max_values` codes (channel, category, risk...; not merchants)."""
    return [f for f, n in zip(fields, sizes) if n <= max_values + 1]


def baseline_features(events: pl.DataFrame, amount: str, merchant: str | None,
                      categorical: dict[str, np.ndarray] | None = None, windows: tuple[int, ...] = WINDOWS,
                      delay_days: int = 7) -> pl.DataFrame:
    """Context + customer spending + terminal risk, one row per event of `events` (same order)."""
    parts = [context_features(events, amount, categorical), customer_features(events, amount, windows)]
    if merchant is not None:
        parts.append(terminal_features(events, merchant, windows, delay_days))
    return pl.concat(parts, how="horizontal", strict=True)
