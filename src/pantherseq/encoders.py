"""Per-field encoders: raw value -> small integer code, vectorised and one event at a time.

Each configured field (schema.FieldConfig) gets an encoder fitted on the training period. Code 0 is the
field's own UNK (missing, unseen or out of range); codes 1..n are its values or buckets. The tokenizer
combines the codes of the token fields into one token (paper §3.2); the per-field codes themselves are
kept for every event so a model can embed each field separately (SPEC §3, "beyond the paper").

Numeric bucketing:
- `quantile`: equal-frequency edges (training quantiles), the paper's CCT choice (100 bins).
- `log_quantile`: equal-width edges on log1p(|x|) between the training 0.1% and 99.9% quantiles: finer
  where values are rare and large, so an amount spike lands in its own bucket instead of the top decile.

Fitting needs only statistics of the training period, so any engine can compute them (`spark/prepare.py`
does with Spark aggregations): a categorical field its value counts (`fit_counts`), a bucketed field the
number of finite values and the values at a few ranks of their sorted order (`fit_order_stats`, through
`quantiles`, which is NumPy's default linear-interpolation quantile read from order statistics).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl

from pantherseq.data.schema import GAP, TIME, FieldConfig

WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
UNKNOWN = "?"


def _fmt(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _fmt_seconds(s: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if s >= size:
            return f"{s / size:.3g}{unit}"
    return f"{s:.3g}s"


def _to_epoch_s(ts: Any) -> float:
    if isinstance(ts, datetime):
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=UTC)
        return ts.timestamp()
    if isinstance(ts, str):
        return _to_epoch_s(datetime.fromisoformat(ts))
    return float(ts)


def _signed_log1p(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def quantile_ranks(n: int, qs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower rank, upper rank, weight) of each quantile q of n sorted values, as NumPy's "linear" method."""
    pos = (n - 1) * np.asarray(qs, dtype=np.float64)
    lo = np.floor(pos)
    gamma = pos - lo
    lo = lo.astype(np.int64)
    return lo, np.minimum(lo + 1, n - 1), gamma


def quantiles(n: int, qs: np.ndarray, value_at: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """np.quantile(x, qs) of n values x, given only `value_at(ranks)` = sorted(x)[ranks] (ranks ascending).

    Bit-identical to NumPy's default method (same virtual index, same two-sided lerp): tested.
    """
    lo, hi, gamma = quantile_ranks(n, qs)
    ranks = np.unique(np.concatenate([lo, hi]))
    vals = np.asarray(value_at(ranks), dtype=np.float64)
    a, b = vals[np.searchsorted(ranks, lo)], vals[np.searchsorted(ranks, hi)]
    diff = b - a
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)


def sorted_values(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """`value_at` for an in-memory array (a partial sort around the wanted ranks)."""
    def value_at(ranks: np.ndarray) -> np.ndarray:
        return np.partition(x, ranks)[ranks] if len(ranks) else np.zeros(0)
    return value_at


class FieldEncoder:
    """Base: `fit(frame)`, `codes(frame) -> int32 (N,)`, `code_one(event)`, `label(code)`, JSON state."""

    def __init__(self, cfg: FieldConfig):
        self.cfg = cfg

    @property
    def size(self) -> int:
        """Number of codes including 0 (the field's UNK)."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass

    def labels(self) -> list[str]:
        return [self.label(c) for c in range(self.size)]


class CategoricalEncoder(FieldEncoder):
    def __init__(self, cfg: FieldConfig):
        super().__init__(cfg)
        self.values: list[str] = []
        self._index: dict[str, int] = {}

    @property
    def size(self) -> int:
        return len(self.values) + 1

    def fit(self, frame: pl.DataFrame) -> None:
        counts = frame[self.cfg.name].cast(pl.Utf8).drop_nulls().value_counts(name="n")
        self.fit_counts(counts[self.cfg.name].to_list(), counts["n"].to_list())

    def fit_counts(self, values: list[str], counts: list[int]) -> None:
        """Fit from the training period's value counts (any order): most frequent first, ties by value."""
        order = sorted(range(len(values)), key=lambda i: (-counts[i], values[i].encode()))
        if self.cfg.max_values:
            order = order[: self.cfg.max_values]
        self.load_state({"values": [values[i] for i in order]})

    def codes(self, frame: pl.DataFrame) -> np.ndarray:
        enum = pl.Enum(self.values)
        col = frame[self.cfg.name].cast(pl.Utf8)
        # strict=False: values outside the vocabulary become null -> code 0
        phys = col.cast(enum, strict=False).to_physical().cast(pl.Int32) + 1
        return phys.fill_null(0).to_numpy().astype(np.int32, copy=False)

    def code_one(self, event: dict[str, Any]) -> int:
        value = event.get(self.cfg.name)
        return 0 if value is None else self._index.get(str(value), 0)

    def label(self, code: int) -> str:
        return self.values[code - 1] if 0 < code <= len(self.values) else UNKNOWN

    def state(self) -> dict[str, Any]:
        return {"values": self.values}

    def load_state(self, state: dict[str, Any]) -> None:
        self.values = [str(v) for v in state["values"]]
        self._index = {v: i + 1 for i, v in enumerate(self.values)}


class BucketEncoder(FieldEncoder):
    """Numeric values (or log time gaps) into buckets by sorted edges; code = 1 + #edges <= x."""

    def __init__(self, cfg: FieldConfig):
        super().__init__(cfg)
        self.edges: list[float] = []
        self._edges = np.zeros(0)

    @property
    def size(self) -> int:
        return len(self.edges) + 2

    def values(self, frame: pl.DataFrame) -> np.ndarray:
        return frame[self.cfg.name].cast(pl.Float64).to_numpy()

    def value_one(self, event: dict[str, Any]) -> float | None:
        value = event.get(self.cfg.name)
        return None if value is None else float(value)

    def fit(self, frame: pl.DataFrame) -> None:
        x = self.values(frame)
        x = x[np.isfinite(x)]
        self.fit_order_stats(x.size, sorted_values(x))

    def transform_sorted(self, x: np.ndarray) -> np.ndarray:
        """The non-decreasing map from the raw column to the values bucketed (identity here)."""
        return np.asarray(x, dtype=np.float64)

    def fit_order_stats(self, n: int, value_at: Callable[[np.ndarray], np.ndarray]) -> None:
        """Fit from the number n of finite training values and `value_at(ranks)` of their sorted order.

        `value_at` may read the raw column: `transform_sorted` maps its values (order is preserved).
        """
        if n == 0:
            self.load_state({"edges": []})
            return
        bins = self.cfg.bins
        def values(ranks: np.ndarray) -> np.ndarray:
            return self.transform_sorted(value_at(ranks))

        if self.cfg.bucketing == "log_quantile":
            lo, hi = quantiles(n, np.array([0.001, 0.999]), lambda ranks: _signed_log1p(values(ranks)))
            le = np.linspace(lo, hi, bins + 1)[1:-1]
            edges = np.sign(le) * np.expm1(np.abs(le))
        else:
            edges = quantiles(n, np.linspace(0, 1, bins + 1)[1:-1], values)
        self.load_state({"edges": np.unique(np.round(edges, 6)).tolist()})

    def codes(self, frame: pl.DataFrame) -> np.ndarray:
        x = self.values(frame)
        out = np.searchsorted(self._edges, x, side="right").astype(np.int32) + 1
        out[~np.isfinite(x)] = 0
        return out

    def code_one(self, event: dict[str, Any]) -> int:
        try:
            x = self.value_one(event)
        except (TypeError, ValueError):
            return 0
        if x is None or not math.isfinite(x):
            return 0
        return bisect.bisect_right(self.edges, x) + 1

    def _bound(self, x: float) -> str:
        return _fmt(x)

    def label(self, code: int) -> str:
        e = self.edges
        if code <= 0 or code > len(e) + 1:
            return UNKNOWN
        if not e:
            return "all"
        if code == 1:
            return f"<{self._bound(e[0])}"
        if code == len(e) + 1:
            return f">={self._bound(e[-1])}"
        return f"[{self._bound(e[code - 2])}, {self._bound(e[code - 1])})"

    def state(self) -> dict[str, Any]:
        return {"edges": self.edges}

    def load_state(self, state: dict[str, Any]) -> None:
        self.edges = [float(v) for v in state["edges"]]
        self._edges = np.asarray(self.edges, dtype=np.float64)


def _epoch_us(frame: pl.DataFrame) -> np.ndarray:
    """The timestamp column as int64 microseconds since the epoch (no copy when already datetime[us])."""
    return frame[TIME].dt.cast_time_unit("us").to_numpy().view(np.int64)


class LogGapEncoder(BucketEncoder):
    """Seconds since the user's previous event, bucketed on log1p(seconds); first event -> code 0."""

    def values(self, frame: pl.DataFrame) -> np.ndarray:
        gap = frame[GAP].cast(pl.Float64).to_numpy()  # nulls come out as NaN
        with np.errstate(invalid="ignore"):
            return np.log1p(np.maximum(gap, 0.0))

    def value_one(self, event: dict[str, Any]) -> float | None:
        gap = event.get(GAP)
        return None if gap is None else math.log1p(max(float(gap), 0.0))

    def transform_sorted(self, x: np.ndarray) -> np.ndarray:
        """Raw gaps (seconds) -> log1p(max(gap, 0)); `values` already applied it to a frame's column."""
        with np.errstate(invalid="ignore"):
            return np.log1p(np.maximum(np.asarray(x, dtype=np.float64), 0.0))

    def fit(self, frame: pl.DataFrame) -> None:
        gap = frame[GAP].cast(pl.Float64).to_numpy()
        gap = gap[np.isfinite(gap)]
        self.fit_order_stats(gap.size, sorted_values(gap))

    def fit_order_stats(self, n: int, value_at: Callable[[np.ndarray], np.ndarray]) -> None:
        """Equal-frequency edges on log1p(gap); `value_at` reads the sorted raw gaps (seconds)."""
        edges = quantiles(n, np.linspace(0, 1, self.cfg.bins + 1)[1:-1],
                          lambda ranks: self.transform_sorted(value_at(ranks))) if n else []
        self.load_state({"edges": np.unique(np.round(edges, 6)).tolist()})

    def _bound(self, x: float) -> str:
        return _fmt_seconds(math.expm1(x))

    def label(self, code: int) -> str:
        return "first" if code == 0 else super().label(code)


class HourEncoder(FieldEncoder):
    """Hour of day in `bins` equal buckets (6 -> 00-04h, 04-08h, ...)."""

    @property
    def width(self) -> int:
        return 24 // self.cfg.bins

    @property
    def size(self) -> int:
        return self.cfg.bins + 1

    def fit(self, frame: pl.DataFrame) -> None:
        pass

    def codes(self, frame: pl.DataFrame) -> np.ndarray:
        hour = (_epoch_us(frame) // 3_600_000_000 % 24).astype(np.int32)
        return hour // self.width + 1

    def code_one(self, event: dict[str, Any]) -> int:
        ts = event[TIME]
        hour = ts.hour if isinstance(ts, datetime) else int(_to_epoch_s(ts) // 3600 % 24)
        return hour // self.width + 1

    def label(self, code: int) -> str:
        if not 0 < code <= self.cfg.bins:
            return UNKNOWN
        lo = (code - 1) * self.width
        return f"{lo:02d}-{lo + self.width:02d}h"


class WeekdayEncoder(FieldEncoder):
    @property
    def size(self) -> int:
        return 8

    def fit(self, frame: pl.DataFrame) -> None:
        pass

    def codes(self, frame: pl.DataFrame) -> np.ndarray:
        days = _epoch_us(frame) // 86_400_000_000
        return ((days + 3) % 7 + 1).astype(np.int32)  # 1970-01-01 was a Thursday; Monday = 1

    def code_one(self, event: dict[str, Any]) -> int:
        ts = event[TIME]
        if not isinstance(ts, datetime):
            ts = datetime.fromtimestamp(_to_epoch_s(ts), tz=UTC)
        return ts.weekday() + 1

    def label(self, code: int) -> str:
        return WEEKDAYS[code - 1] if 0 < code <= 7 else UNKNOWN


def build_encoder(cfg: FieldConfig) -> FieldEncoder:
    if cfg.kind == "categorical":
        return CategoricalEncoder(cfg)
    if cfg.kind == "numeric":
        return BucketEncoder(cfg)
    return {"hour": HourEncoder, "weekday": WeekdayEncoder, "log_gap": LogGapEncoder}[cfg.derive](cfg)
