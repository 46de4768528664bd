"""Hand-made fraud features (SPEC §7 baseline, the Fraud Detection Handbook's standard set), causal by construction.
Each feature lives here once, in a batch form (every event of a frame, for `pantherseq fraud`) and a one-event
form (the service's request path, serve/scorer.py) side by side:

    batch form                                          one-event form
    context_features(events, amount, categorical)       context_one(dt, amount, codes)
        ψ: amount, hour, weekend, night (+ low-cardinality fields' codes)
    customer_features(events, amount, windows)          customer_one(times, amounts, t, amount, windows)
        per customer: count and mean amount over 1/7/30 days, the current event included
    robust_features(events, amount, days)               robust_one(times, amounts, t, amount, days)
        the amount against the customer's own past `days` days, strictly before the event: past median,
        z = (amount − median) / IQR, ratio to the median, number of past events (contamination-robust)
    terminal_features(events, merchant, windows, delay) TerminalHistory.features(terminal, t)
        per terminal: transactions, frauds and fraud rate over 1/7/30 days *ending `delay` days ago*
        (labels are only known after the delay)
    baseline_features(events, ...)                      all of the above, one row per event, in input order

`events` is a run's `events.parquet` (or any frame with `user_id`, `timestamp`, the amount and merchant
fields and `label`); the output rows are aligned with its rows.

Exact arithmetic, so both forms agree bit for bit on any CPU. Window sums are integer: counts, fraud
counts and amounts in units of 1/AMOUNT_SCALE (`amount_units`, rounded to the nearest unit, 1e-4 of the
currency), summed in int64, which no summation order can change; a mean or a rate is then one float64
division, rounded once to float32. Float sums would differ in their last bits between a cumulative-sum
difference (batch) and a direct sum (one event), and a LightGBM split can fall between the two. The robust
deviation's quantiles are order statistics of the integer units (a sort, then an interpolation by k/4:
exact in float64), computed by one function (`robust_from_sorted`) for both forms.

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

import threading
from datetime import datetime

import numpy as np
import polars as pl

from pantherseq.data.schema import DAY, LABEL, TIME, USER

WINDOWS = (1, 7, 30)
AMOUNT_SCALE = 10_000  # amounts are summed in int64 units of 1e-4 (exact; overflows past ~9e14 in total)
ROBUST_DAYS = 30  # the customer's past that the robust amount deviation compares an amount with
ROBUST_FLOOR = 0.01 * AMOUNT_SCALE  # the smallest scale of the robust z (one cent)
ROBUST_COLUMNS = ("rz_n", "rz_median", "rz_z", "rz_ratio")


def amount_units(amounts: np.ndarray | float) -> np.ndarray:
    """Amounts -> int64 units of 1/AMOUNT_SCALE (nearest), the exact form every amount sum uses."""
    return np.rint(np.asarray(amounts, dtype=np.float64) * AMOUNT_SCALE).astype(np.int64)


def mean_amount(units: np.ndarray | int, n: np.ndarray | float) -> np.ndarray:
    """Σ units over n events -> the mean amount (float64; both forms then round it once to float32)."""
    return (np.asarray(units, dtype=np.float64) / AMOUNT_SCALE) / np.maximum(np.asarray(n, np.float64), 1.0)


def fraud_rate(frauds: np.ndarray | int, n: np.ndarray | int) -> np.ndarray:
    return np.asarray(frauds, dtype=np.float64) / np.maximum(np.asarray(n, np.float64), 1.0)


def _seconds(events: pl.DataFrame) -> np.ndarray:
    return (events[TIME].dt.epoch("us").to_numpy() // 1_000_000).astype(np.int64)


def _codes(col: pl.Series) -> np.ndarray:
    """Dense integer codes of a column, only to group equal values (nulls get their own code)."""
    return col.cast(pl.Utf8).fill_null("\0null").rank("dense").to_numpy().astype(np.int64)


def window_bounds(group: np.ndarray, t: np.ndarray, width: int, lag: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows sorted by (group, time, row) -> (order, lo, hi): in that order, row order[i]'s window is the
    slice [lo[i], hi[i]), the rows of its group with t_i − lag − width < t_j ≤ t_i − lag; with lag = 0 it ends
    at row i itself (hi = i + 1), so a row never sees a later row with the same timestamp."""
    n = len(t)
    order = np.lexsort((np.arange(n), t, group))
    if n == 0:
        return order, np.zeros(0, np.int64), np.zeros(0, np.int64)
    span = int(lag + width + 1)
    trel = t - t.min() + span  # >= span, so key - offset stays inside the group
    big = int(trel.max()) + span + 1
    key = group[order].astype(np.int64) * big + trel[order]
    hi = np.arange(1, n + 1) if lag == 0 else np.searchsorted(key, key - lag, side="right")
    lo = np.searchsorted(key, key - lag - width, side="right")
    return order, lo, hi


def window_sums(group: np.ndarray, t: np.ndarray, values: np.ndarray, width: int, lag: int = 0
                ) -> np.ndarray:
    """For each row i: Σ values[j] over rows j of the same group with t_i − lag − width < t_j ≤ t_i − lag
    (`window_bounds`). Vectorised: one sort, a cumulative sum and two binary searches.
    values: (N,) or (N, C) int64 -> the same shape, int64 (integer sums: exact in any order).
    """
    n = len(t)
    vals = np.asarray(values, dtype=np.int64).reshape(n, -1)
    if n == 0:
        return vals.reshape(np.shape(values))
    order, lo, hi = window_bounds(group, t, width, lag)
    cum = np.vstack([np.zeros((1, vals.shape[1]), np.int64), np.cumsum(vals[order], axis=0)])
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


def context_one(dt: datetime, amount: float, codes: dict[str, int] | None = None) -> dict[str, float]:
    """`context_features` of ONE event: dt naive UTC (as events.parquet), codes {field: tokenizer code}."""
    hour = dt.hour
    out = {"amount": float(amount), "hour": float(np.float32(hour + dt.minute / 60.0)),
           "weekend": float(dt.isoweekday() >= 6), "night": float(hour < 6)}
    return out | {f"ctx_{name}": float(c) for name, c in (codes or {}).items()}


def customer_features(events: pl.DataFrame, amount: str, windows: tuple[int, ...] = WINDOWS) -> pl.DataFrame:
    """Per customer, over (t − w days, t], current transaction included: count and mean amount."""
    user, t = _codes(events[USER]), _seconds(events)
    units = amount_units(events[amount].cast(pl.Float64).fill_null(0.0).to_numpy())
    cols = {}
    for w in windows:
        s = window_sums(user, t, np.stack([np.ones_like(units), units], 1), w * DAY)
        cols[f"cust_n_{w}d"] = s[:, 0].astype(np.float32)
        cols[f"cust_mean_amount_{w}d"] = mean_amount(s[:, 1], s[:, 0]).astype(np.float32)
    return pl.DataFrame(cols)


def customer_one(times: np.ndarray, amounts: np.ndarray, t: int, amount: float, windows: tuple[int, ...]
                 = WINDOWS) -> dict[str, float]:
    """`customer_features` of ONE event at time t (unix s) with this amount, given the customer's earlier
    events (times, amounts), all at or before t (the state keeps the last max(windows) days)."""
    times = np.asarray(times, dtype=np.int64)
    units = amount_units(amounts)
    now = int(amount_units(amount))
    out = {}
    for w in windows:
        keep = times > t - w * DAY
        n = int(keep.sum()) + 1
        out[f"cust_n_{w}d"] = float(np.float32(n))
        out[f"cust_mean_amount_{w}d"] = float(np.float32(mean_amount(int(units[keep].sum()) + now, n)))
    return out


def _quantile(xs: np.ndarray, n: np.ndarray, num: int, den: int) -> np.ndarray:
    """The num/den quantile (linear interpolation, numpy's default) of each row's first n values of xs
    (sorted ascending), NaN where n = 0. Integer units and fractions k/den: exact in float64."""
    rows = np.arange(len(n))
    m = np.maximum(n - 1, 0)
    lo, frac = (m * num) // den, ((m * num) % den) / den
    a = xs[rows, lo].astype(np.float64) if xs.shape[1] else np.zeros(len(n))
    b = xs[rows, np.minimum(lo + 1, np.maximum(n - 1, 0))].astype(np.float64) if xs.shape[1] else a
    return np.where(n > 0, a + frac * (b - a), np.nan)


def robust_from_sorted(xs: np.ndarray, n: np.ndarray, now: np.ndarray) -> dict[str, np.ndarray]:
    """The robust amount deviation of R events from their pasts: xs (R, K) int64 amount units sorted
    ascending, the first n[r] of row r being its past (the rest padding), now (R,) the event's own units.
    Both forms call this with the same values, so they agree bit for bit. Columns (float32):
    rz_n (past events), rz_median (past median amount), rz_z = (amount − median) / scale with scale =
    max(IQR, median / 10, 0.01) (a constant history has IQR 0), rz_ratio = amount / median; NaN without
    history."""
    n = np.asarray(n, np.int64)
    med = _quantile(xs, n, 1, 2)
    iqr = _quantile(xs, n, 3, 4) - _quantile(xs, n, 1, 4)
    scale = np.maximum(np.maximum(iqr, np.abs(med) / 10.0), ROBUST_FLOOR)
    now = np.asarray(now, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(med > 0, now / np.where(med > 0, med, 1.0), np.nan)
        return {"rz_n": n.astype(np.float32), "rz_median": (med / AMOUNT_SCALE).astype(np.float32),
                "rz_z": ((now - med) / scale).astype(np.float32), "rz_ratio": ratio.astype(np.float32)}


def robust_features(events: pl.DataFrame, amount: str, days: int = ROBUST_DAYS, chunk: int = 4096
                    ) -> pl.DataFrame:
    """Per event, its amount against the customer's own past `days` days (the events strictly before it in
    (time, row) order, time > t − days): `robust_from_sorted`. A median and an IQR are robust to the few
    frauds a compromised history holds, where a mean is not."""
    user, t = _codes(events[USER]), _seconds(events)
    units = amount_units(events[amount].cast(pl.Float64).fill_null(0.0).to_numpy())
    order, lo, hi = window_bounds(user, t, days * DAY)
    su, lo, pos = units[order], lo.astype(np.int64), hi.astype(np.int64) - 1  # past = [lo, pos)
    cols: dict[str, np.ndarray] = {}
    for a in range(0, len(t), chunk):
        b = min(a + chunk, len(t))
        n = pos[a:b] - lo[a:b]
        idx = lo[a:b, None] + np.arange(int(n.max(initial=0)))[None, :]
        past = np.where(idx < pos[a:b, None], su[np.minimum(idx, max(len(su) - 1, 0))], np.iinfo(np.int64).max)
        part = robust_from_sorted(np.sort(past, axis=1), n, su[a:b])
        for k, v in part.items():
            cols.setdefault(k, np.empty(len(t), np.float32))[order[a:b]] = v
    if not cols:
        cols = {k: np.zeros(0, np.float32) for k in ROBUST_COLUMNS}
    return pl.DataFrame(cols)


def robust_one(times: np.ndarray, amounts: np.ndarray, t: int, amount: float, days: int = ROBUST_DAYS
               ) -> dict[str, float]:
    """`robust_features` of ONE event at time t with this amount, given the customer's earlier events."""
    past = np.sort(amount_units(amounts)[np.asarray(times, np.int64) > t - days * DAY])
    out = robust_from_sorted(past[None, :], np.array([len(past)]), amount_units(np.array([amount])))
    return {k: float(v[0]) for k, v in out.items()}


def terminal_features(events: pl.DataFrame, merchant: str, windows: tuple[int, ...] = WINDOWS,
                      delay_days: int = 7) -> pl.DataFrame:
    """Per terminal / merchant, over (t − delay − w, t − delay]: transactions, frauds and the fraud rate.
    Unknown labels (null or -1) count as transactions, not as frauds."""
    term, t = _codes(events[merchant]), _seconds(events)
    label = (events[LABEL].fill_null(0).cast(pl.Int64).to_numpy() == 1).astype(np.int64) \
        if LABEL in events.columns else np.zeros(events.height, np.int64)
    cols = {}
    for w in windows:
        s = window_sums(term, t, np.stack([np.ones_like(label), label], 1), w * DAY, lag=delay_days * DAY)
        cols[f"term_n_{w}d"] = s[:, 0].astype(np.float32)
        cols[f"term_frauds_{w}d"] = s[:, 1].astype(np.float32)
        cols[f"term_rate_{w}d"] = fraud_rate(s[:, 1], s[:, 0]).astype(np.float32)
    return pl.DataFrame(cols)


class TerminalHistory:
    """The one-event form of `terminal_features`: every event at each terminal / merchant (time, fraud
    label, an id for late labels), kept sorted by time. Loaded from the run's events before the embedding
    cut-off, then grown with the served events (label unknown = 0 until `/feedback`)."""

    def __init__(self, windows: tuple[int, ...] = WINDOWS, delay_days: int = 7):
        self.windows, self.lag = [int(w) for w in windows], int(delay_days) * DAY
        self._times: dict[str, np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}
        self._ids: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def load(self, terminals: np.ndarray, times: np.ndarray, labels: np.ndarray) -> None:
        order = np.lexsort((times, terminals))
        terms, times, labels = terminals[order], times[order], labels[order]
        cuts = np.flatnonzero(terms[1:] != terms[:-1]) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(terms)]):
            if b > a:
                key = str(terms[a])
                self._times[key] = times[a:b].astype(np.int64)
                self._labels[key] = labels[a:b].astype(np.int8)
                self._ids[key] = np.full(b - a, -1, dtype=np.int64)

    def add(self, terminal: str, t: int, label: int = 0, event_id: int = -1) -> None:
        with self._lock:
            times = self._times.get(terminal, np.zeros(0, np.int64))
            i = int(np.searchsorted(times, t, side="right"))
            self._times[terminal] = np.insert(times, i, t)
            self._labels[terminal] = np.insert(self._labels.get(terminal, np.zeros(0, np.int8)), i, label)
            self._ids[terminal] = np.insert(self._ids.get(terminal, np.zeros(0, np.int64)), i, event_id)

    def set_label(self, terminal: str, event_id: int, label: int) -> bool:
        with self._lock:
            ids = self._ids.get(terminal)
            hit = np.flatnonzero(ids == event_id) if ids is not None else []
            if len(hit) == 0:
                return False
            self._labels[terminal][hit[0]] = label
            return True

    def label_of(self, terminal: str, event_id: int) -> int | None:
        ids = self._ids.get(terminal)
        hit = np.flatnonzero(ids == event_id) if ids is not None else []
        return int(self._labels[terminal][hit[0]]) if len(hit) else None

    def ranges(self, t: int) -> list[tuple[int, int]]:
        """The time ranges (lo, hi] the features of an event at t read, one per window."""
        return [(t - self.lag - w * DAY, t - self.lag) for w in self.windows]

    def features(self, terminal: str | None, t: int, extra: list[tuple[int, int]] | None = None
                 ) -> dict[str, float]:
        """The terminal features of an event at t; `extra`: per window, (transactions, frauds) held
        elsewhere (the serving store's served events), added to this history's counts."""
        times = self._times.get(terminal) if terminal is not None else None
        out = {}
        for k, w in enumerate(self.windows):
            n = f = 0
            if times is not None:
                hi = int(np.searchsorted(times, t - self.lag, side="right"))
                lo = int(np.searchsorted(times, t - self.lag - w * DAY, side="right"))
                n, f = hi - lo, int(self._labels[terminal][lo:hi].astype(np.int64).sum())
            if extra is not None:
                n, f = n + int(extra[k][0]), f + int(extra[k][1])
            out[f"term_n_{w}d"], out[f"term_frauds_{w}d"] = float(np.float32(n)), float(np.float32(f))
            out[f"term_rate_{w}d"] = float(np.float32(fraud_rate(f, n)))
        return out


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
