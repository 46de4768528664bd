"""The per-user state the service scores against, and its byte format.

A `UserState` is what `pantherseq embed` writes for every user and the refresh worker rewrites after each
accepted event:

    user_id, user_idx (row of the run's profile; -1 = a user the run never saw), model_version,
    n_events (events folded in), log_seq (the last event-log entry folded in), last_time (unix s),
    refreshed_at (unix s, wall clock of the last refresh)
    tokens (L,) int32, codes (L, F) int32, gap (L,) int8   the last L = max_len events, model inputs
    times (M,) int64, amounts (M,) float64                  the events of the last `spend_days` days
                                                           (the customer-spending features)
    h (D,) float32      the causal state after the last event: the model's prediction of the next one
    pooled (D,) float32 the mean of the causal states over the window (the pooled recent history; stored
                        as "e_u" by the first versions, which `decode` still reads)
    top_ids (k,) int32, top_p (k,) float32, mu, sigma       the predicted next-behaviour distribution
                                                           (top-k; μ = 1/V, σ = its std over V)
    recent_delta (M, S) float32  the short-window Δ of the last M = max(WINDOW_SIZES) − 1 events as each was
                        scored (columns: the scorer's `DeviationVocab.window_base`; NaN = none), what the
                        `mean<k>_*` features of the next event read (fraud/personal.py)
    pred (P,) float64   the compact prediction of the next event made from h (fraud/deviation.py
                        `Prediction.pack`, ~17 KB at V = 60,004): what the next event's Δ reads, so a
                        request needs no pass over the vocabulary

Byte format (schema 2), what the store keeps as an opaque value:

    b"PSU" + u8 schema version | u32 little-endian n = header length | n bytes of UTF-8 JSON header
    {"scalars": {...}, "arrays": [[name, dtype, shape], ...]} | the arrays' bytes back to back, C order,
    little-endian (dtypes "<i4", "<i8", "<f4", "<f8", "|i1").

Schema 2 added `recent_delta`, schema 3 `pred`. Older states still decode: without `recent_delta` the window
means of their next events see only the events scored since (`pantherseq embed` again restores exact
parity); without `pred` the scorer computes the prediction from h on the request path (one V × D product,
then cached) until the refresh stores one. A reader of an older schema refuses a newer state with "re-run
embed" rather than misreading it.

Accepted events go to the store's per-user log as JSON (`encode_event`): the raw request fields, time,
token, codes and gap bucket, and `window`, the event's short-window Δ as it was scored (absent in logs
written before schema 2: folded as NaN), so a restart can fold them into the state without the request.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, fields

import numpy as np

MAGIC = b"PSU"
SCHEMA = 3
READS = (1, 2, 3)  # schema 1 lacks recent_delta, schemas 1-2 lack pred (decoded empty)
STORED_PREDICTION = 3  # the first schema whose states carry `pred`
_ARRAYS = {"tokens": "<i4", "codes": "<i4", "gap": "|i1", "times": "<i8", "amounts": "<f8", "h": "<f4",
           "pooled": "<f4", "top_ids": "<i4", "top_p": "<f4", "recent_delta": "<f4", "pred": "<f8"}


_RENAMED = {"e_u": "pooled"}  # names of schema-1 arrays written by earlier versions


class StateFormatError(ValueError):
    """A stored value that is not a user state this version reads."""


def _empty(dtype: str, *shape: int) -> np.ndarray:
    return np.zeros(shape or (0,), dtype=np.dtype(dtype))


@dataclass
class UserState:
    user_id: str
    user_idx: int = -1
    model_version: str = ""
    n_events: int = 0
    log_seq: int = 0
    last_time: int | None = None
    refreshed_at: float = 0.0
    mu: float = float("nan")
    sigma: float = float("nan")
    tokens: np.ndarray = field(default_factory=lambda: _empty("<i4"))
    codes: np.ndarray = field(default_factory=lambda: _empty("<i4", 0, 0))
    gap: np.ndarray = field(default_factory=lambda: _empty("|i1"))
    times: np.ndarray = field(default_factory=lambda: _empty("<i8"))
    amounts: np.ndarray = field(default_factory=lambda: _empty("<f8"))
    h: np.ndarray = field(default_factory=lambda: _empty("<f4"))
    pooled: np.ndarray = field(default_factory=lambda: _empty("<f4"))
    top_ids: np.ndarray = field(default_factory=lambda: _empty("<i4"))
    top_p: np.ndarray = field(default_factory=lambda: _empty("<f4"))
    recent_delta: np.ndarray = field(default_factory=lambda: _empty("<f4", 0, 0))
    pred: np.ndarray = field(default_factory=lambda: _empty("<f8"))

    @property
    def has_prediction(self) -> bool:
        """False for a user with no event yet (cold start): no h, no Δ."""
        return self.h.size > 0

    def encode(self) -> bytes:
        scalars = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _ARRAYS}
        arrays = [np.ascontiguousarray(getattr(self, name), dtype=np.dtype(dt)) for name, dt in _ARRAYS.items()]
        header = json.dumps({"scalars": scalars, "arrays": [[n, dt, list(a.shape)] for (n, dt), a in
                                                           zip(_ARRAYS.items(), arrays)]}).encode()
        return b"".join([MAGIC, bytes([SCHEMA]), struct.pack("<I", len(header)), header,
                         *(a.tobytes() for a in arrays)])

    @classmethod
    def decode(cls, blob: bytes) -> UserState:
        if len(blob) < 8 or blob[:3] != MAGIC:
            raise StateFormatError("not a pantherseq user state (bad magic)")
        if blob[3] not in READS:
            raise StateFormatError(f"user state schema {blob[3]}, this version reads {READS}: re-run embed")
        try:
            (n,) = struct.unpack("<I", blob[4:8])
            head = json.loads(blob[8:8 + n])
            pos, kwargs = 8 + n, dict(head["scalars"])
            for name, dt, shape in head["arrays"]:
                size = int(np.prod(shape)) * np.dtype(dt).itemsize
                if pos + size > len(blob):
                    raise StateFormatError("truncated user state")
                kwargs[_RENAMED.get(name, name)] = np.frombuffer(blob[pos:pos + size], dtype=np.dtype(dt)
                                                                 ).reshape(shape).copy()
                pos += size
            return cls(**kwargs)
        except StateFormatError:
            raise
        except (ValueError, KeyError, TypeError) as exc:  # a damaged header: one error type for every cause
            raise StateFormatError(f"damaged user state ({type(exc).__name__})") from None


def encode_event(event: dict) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


def decode_event(blob: bytes) -> dict:
    """A logged event; StateFormatError when the bytes are not one (bad JSON, a missing or mistyped key), so
    a start-up replay can skip and count it."""
    try:
        rec = json.loads(blob)
        ok = (isinstance(rec, dict) and isinstance(rec.get("fields"), dict) and isinstance(rec.get("codes"), list)
              and all(type(rec.get(k)) is int for k in ("time", "token", "gap"))
              and all(type(c) is int for c in rec["codes"])
              and all(type(x) in (int, float) for x in rec.get("window") or ()))
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise StateFormatError("not a logged event")
    return rec
