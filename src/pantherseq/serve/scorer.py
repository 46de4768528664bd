"""Scoring one transaction from cached state, with no web import: parse → features → score, and refresh.

`Scorer(run, model)` loads what scoring needs once: the tokenizer, the generative model (used only by
`refresh`, never on the request path), its output head for the Δ, and — when `pantherseq fraud` was run for
this model — the risk model of the chosen feature set (any of fraud/risk.py's RISK_MODELS) and the
embedding PCA. `features` computes, for one event, the same features as `pantherseq fraud` with the same
functions (their one-event forms):

- ψ context, customer spending over 1/7/30 days, the robust amount deviation against the customer's last
  30 days, terminal risk                                             fraud/features.py (exact integer sums)
- Δ against the prediction of the user's next event the state stores  fraud/behaviour.py DeviationVocab
  (its compact form, fraud/deviation.py: a request reads it with a few dot products of h, no pass over
  the vocabulary; field heads, copy head and new-vs-known counts from the state's window; the short-window
  means from the state's `recent_delta`, the Δ of its last events as they were scored)  fraud/personal.py
- the pooled and the recent state, projected by the same PCA         fraud/pipeline.py project

and `score` runs the risk model on them. A run without a risk model (MovieLens, or `fraud` not run) is
scored by the deviation itself: the score is the surprisal −log P(x_new).

Offline/online parity: offline, the features of event j come from the window [w0, j) of `scoring_windows`;
online, h is computed on the same window of the user's last events (`window_start` of the fraud config's
`context`: serve/windows.py, which also keeps the windows between refreshes to extend them by the new
events). The states being computed in float64 and rounded once on both paths, every served score equals
the offline one (tests/serve/test_service.py).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl
import torch

from pantherseq.data.dataset import Profile, gap_bucket_one
from pantherseq.data.schema import DAY, GAP, LABEL, N_SPECIAL, PAD, TIME
from pantherseq.errors import ConfigError
from pantherseq.fraud.behaviour import DeviationVocab, final_states, float64_copy
from pantherseq.fraud.config import MERCHANT_FIELDS
from pantherseq.fraud.deviation import Prediction
from pantherseq.fraud.features import (
    ROBUST_DAYS,
    WINDOWS,
    TerminalHistory,
    context_one,
    customer_one,
    robust_one,
)
from pantherseq.fraud.personal import WINDOW_SIZES, state_keys
from pantherseq.fraud.pipeline import EMBEDDINGS, project
from pantherseq.fraud.risk import load_risk_model
from pantherseq.model.base import Batch, NeuralModel
from pantherseq.model.incremental import freeze, supports
from pantherseq.run import RunDir
from pantherseq.serve.cache import LruCache
from pantherseq.serve.state import UserState
from pantherseq.serve.windows import Windows, window_len
from pantherseq.train.checkpoint import load_model

log = logging.getLogger(__name__)
EPOCH_MIN, EPOCH_MAX = 0, 4_102_444_800  # 1970-01-01 .. 2100-01-01: outside is an absurd timestamp
TOP_K = 10


@dataclass
class Event:
    """A parsed request: raw fields, time, the tokenizer's token and codes, the gap bucket."""

    user_id: str
    time: int  # unix seconds
    dt: datetime  # naive UTC, as events.parquet stores it
    fields: dict[str, Any]
    token: int
    codes: list[int]
    gap: int

    def record(self) -> dict[str, Any]:
        """What the event log keeps (state.encode_event)."""
        return {"time": self.time, "fields": self.fields, "token": self.token, "codes": self.codes,
                "gap": self.gap}


def parse_time(value: Any) -> tuple[int, datetime]:
    """ISO 8601 text (naive = UTC) or unix seconds -> (unix seconds, naive UTC datetime). ValueError if
    unparsable or outside 1970..2100."""
    if isinstance(value, bool):
        raise ValueError("a time, not a boolean")  # noqa: TRY004 (pydantic turns ValueError into a 422)
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError("not a finite number")
        secs = float(value)
    else:
        dt = datetime.fromisoformat(str(value))
        secs = (dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt).timestamp()
    if not EPOCH_MIN <= secs < EPOCH_MAX:
        raise ValueError("outside 1970-01-01 .. 2100-01-01")
    t = math.floor(secs)
    return t, datetime.fromtimestamp(secs, UTC).replace(tzinfo=None)


def _version_key(state: UserState) -> tuple:
    return (state.refreshed_at, state.n_events, state.log_seq)


class Scorer:
    """A run's model, tokenizer and (optional) risk model, ready to score single events (see module doc)."""

    def __init__(self, run: RunDir | str, model_name: str, fraud_dir: str | None = None,
                 feature_set: str = "hybrid", threads: int = 1, cache_mb: int = 512, window_cache_mb: int = 512):
        self.run = RunDir.of(run).require()
        torch.set_num_threads(threads)
        self.cfg = self.run.config()
        self.tok = self.run.tokenizer()
        model, _ = load_model(self.run, model_name)
        if not isinstance(model, NeuralModel):
            raise ConfigError(f"model {model_name!r} is a count model: serving needs a neural model")
        self.model, self.model64 = model.eval(), freeze(float64_copy(model))  # SPRM folded once: refresh only
        self.model_name = model_name
        digest = hashlib.sha256(self.run.checkpoint(model_name).read_bytes()).hexdigest()
        self.model_version = f"{model_name}@{digest[:12]}"
        # what the stored tokens mean: a store written with another tokenizer cannot be served (identity.py)
        self.run_id = hashlib.sha256(self.run.tokenizer_file.read_bytes()).hexdigest()[:12]
        self.max_len = int(model.cfg.max_len)
        self.vocab = DeviationVocab(self.tok, model)
        # a cold start gets them all NaN
        self.delta_names = [f"d_{k}" for k in (*self.vocab.delta_names, *self.vocab.window_names)]
        # per user, the compact `Prediction` of the next event for states stored without one (schema < 3)
        self.cache = LruCache(cache_mb << 20)
        self.kinds = {f.name: f.kind for f in self.cfg.fields}
        self.labels: list[str] | None = None  # readable token labels, made on first use
        self.user_index = self.run.user_index()
        self.profile = Profile.of_run(self.run, len(self.user_index))
        self._load_risk(fraud_dir, feature_set)
        self.model_windows = self._model_windows(window_cache_mb)

    # -- set-up ---------------------------------------------------------------------------------------
    def _load_risk(self, fraud_dir: str | None, feature_set: str) -> None:
        fdir = self.run.fraud_dir(fraud_dir)
        report = fdir.read_report()
        fc: dict[str, Any] = report["config"] if report else {}
        self.risk, self.feature_set, self.pca, self.categorical = None, None, {}, []
        if report:
            if report.get("model") != self.model_name:
                raise ConfigError(f"{fdir.report} was made with model {report.get('model')!r}, not "
                                  f"{self.model_name!r}: re-run `pantherseq fraud` or give --fraud-dir")
            self.risk = load_risk_model(fdir.risk_model(feature_set))
            pca = np.load(fdir.embedding_pca)
            self.pca = {k: pca[k] for k in pca.files}
            self.feature_set = feature_set
            self.categorical = [c.removeprefix("ctx_") for c in report.get("categorical", [])]
        self.merchant = next((f for f in [fc.get("merchant_field"), *MERCHANT_FIELDS] if f and f in self.kinds),
                             None)
        self.amount_field = fc.get("amount_field", "amount")
        self.context = int(fc.get("context", 100))  # the offline pass's windows (`embed` computes recent_delta so)
        self.windows = tuple(int(w) for w in fc.get("windows", WINDOWS))
        self.robust_days = int(fc.get("robust_days", ROBUST_DAYS))
        self.spend_days = max(*self.windows, self.robust_days)  # the state keeps what both read
        # the run's events before the embedding cut-off (the same in every process, read-only once loaded);
        # the served events and their labels are the store's (Service.terminal_counts)
        self.terminals = TerminalHistory(self.windows, int(fc.get("delay_days", 7)))
        # how far back the terminal features read (the longest window before the label delay): logged events
        # older than this before a user's last event are folded into the state and need not be replayed
        self.log_horizon_s = (max(self.windows) * DAY + self.terminals.lag) if self.merchant is not None else 0
        if self.risk is not None:
            missing = sorted(set(self.risk.features) - set(self.feature_names()))
            if missing:
                raise ConfigError(f"{fdir.path}: the {feature_set!r} risk model reads features this version does "
                                  f"not compute ({', '.join(missing[:5])}): re-run `pantherseq fraud`")

    def _model_windows(self, mb: int) -> Windows | None:
        """The refresh's cache of model windows (serve/windows.py); None when off or the model has no
        incremental forward (its refresh then recomputes every window)."""
        if mb <= 0:
            return None
        if not supports(self.model64):
            log.info("%s: no incremental refresh for this model, every refresh is a full-window forward",
                     self.model_name)
            return None
        return Windows(self.model64, self.context, mb << 20)

    def feature_names(self) -> list[str]:
        """Every feature `features` returns, in order."""
        ev = Event("", 0, datetime(2000, 1, 1), {}, 0, [0] * len(self.tok.field_names), 0)
        return list(self.features(ev, UserState(user_id="", codes=np.zeros((0, len(self.tok.field_names)),
                                                                             np.int32))))

    def load_terminals(self, until: int | None) -> int:
        """Fill the terminal history from the run's events before `until` (unix s); returns the count."""
        if self.merchant is None:
            return 0
        has_label = LABEL in self.run.event_columns()
        ev = self.run.read_events([self.merchant, TIME, *([LABEL] if has_label else [])])
        secs = ev[TIME].dt.epoch("us").to_numpy() // 1_000_000
        keep = secs < until if until is not None else np.ones(len(secs), bool)
        labels = (ev[LABEL].fill_null(0).cast(pl.Int64).to_numpy() == 1) if has_label else np.zeros(len(secs), bool)
        self.terminals.load(ev[self.merchant].cast(pl.Utf8).fill_null("").to_numpy()[keep], secs[keep],
                            labels[keep].astype(np.int8))
        return int(keep.sum())

    # -- request path ---------------------------------------------------------------------------------
    def parse(self, user_id: str, when: Any, fields: dict[str, Any], last_time: int | None) -> Event:
        t, dt = parse_time(when)
        gap_s = None if last_time is None else float(t - last_time)
        token, codes = self.tok.encode_one({**fields, TIME: dt, GAP: gap_s})
        return Event(user_id, t, dt, fields, int(token), [int(c) for c in codes], gap_bucket_one(gap_s))

    def features(self, ev: Event, state: UserState, served: list[tuple[int, int]] | None = None
                 ) -> dict[str, float]:
        """Every feature of the risk model for `ev` given the user's state (events before it folded in);
        `served`: per window, (transactions, frauds) of the served events at the event's terminal (from the
        store), added to the run's terminal history."""
        amount = float(ev.fields.get(self.amount_field) or 0.0)
        names = self.tok.field_names
        out = context_one(ev.dt, amount, {c: ev.codes[names.index(c)] for c in self.categorical})
        out |= customer_one(state.times, state.amounts, ev.time, amount, self.windows)
        out |= robust_one(state.times, state.amounts, ev.time, amount, self.robust_days)
        if self.merchant is not None:
            m = ev.fields.get(self.merchant)
            out |= self.terminals.features(None if m is None else str(m), ev.time, served)
        out |= self.deviation(ev, state)
        d = self.model.cfg.d_model
        for name, vec in zip(EMBEDDINGS, (state.pooled, state.h)):
            x = vec.reshape(1, -1) if vec.size else np.full((1, d), np.nan, np.float32)
            if self.pca:
                x = project(x, self.pca[f"{name}_mean"], self.pca[f"{name}_comps"])
            out.update({f"{name}_{i}": float(v) for i, v in enumerate(x[0])})
        return out

    def deviation(self, ev: Event, state: UserState) -> dict[str, float]:
        """Δ of the event against the user's cached prediction (NaN for a user with no history, as offline):
        the same `DeviationVocab.deviation` as `pantherseq fraud`, on one row."""
        if not state.has_prediction:
            return dict.fromkeys(self.delta_names, float("nan"))
        pred = self.prediction(state)
        keys, key_codes = state_keys(state.tokens, state.codes, self.vocab.reach)
        out = self.vocab.deviation(pred, torch.tensor([ev.token], dtype=torch.int64),
                                   torch.tensor([ev.codes], dtype=torch.int64), keys, key_codes)
        feats = dict(zip(out, torch.stack(list(out.values())).numpy()))  # {name: (1,)}, one copy, not ~30
        feats |= self.vocab.windows(self.recent_past(state), feats)
        return {f"d_{k}": float(v[0]) for k, v in feats.items()}

    def recent_past(self, state: UserState) -> dict[str, np.ndarray]:
        """The short-window Δ of the state's last max(WINDOW_SIZES) − 1 events {base: (1, M)}, oldest first,
        NaN-padded (a state without `recent_delta`, or of another model's columns: all NaN)."""
        m, base = max(WINDOW_SIZES) - 1, self.vocab.window_base
        past = np.full((m, len(base)), np.nan, np.float32)
        if m:
            rows = self._recent_rows(state)[-m:]
            past[m - len(rows):] = rows
        return {n: past[None, :, i] for i, n in enumerate(base)}

    def _recent_rows(self, state: UserState) -> np.ndarray:
        """state.recent_delta (M, S), or (0, S) when it has none or another model's columns."""
        s = len(self.vocab.window_base)
        r = state.recent_delta
        return r if r.ndim == 2 and r.shape[1] == s else np.zeros((0, s), np.float32)

    def record(self, ev: Event, feats: dict[str, float]) -> dict[str, Any]:
        """What the event log keeps of a scored event: `ev.record()` and `window`, its short-window Δ as
        scored (folded into the state's `recent_delta`)."""
        return {**ev.record(), "window": [feats.get(f"d_{n}", float("nan")) for n in self.vocab.window_base]}

    def _stored(self, state: UserState) -> Prediction | None:
        """The compact prediction the state stores (the refresh wrote it), None when it has none of this
        model's layout (a state of schema < 3)."""
        if state.pred.size != self.vocab.widths.total:
            return None
        return self.vocab.unpack(state.pred, state.h)

    def prediction(self, state: UserState) -> Prediction:
        """The compact prediction of the state's next event: the stored one, else the cached one, else one
        V × D product (then cached)."""
        pred = self._stored(state)
        if pred is not None:
            return pred
        key = _version_key(state)
        pred = self.cache.get(state.user_id, key)
        if pred is None:
            with torch.no_grad():
                pred = self.vocab.predict(torch.from_numpy(state.h.astype(np.float32)).view(1, -1)).compact()
            self.cache.put(state.user_id, key, pred)
        return pred

    def warm(self, states: list[UserState], batch: int = 256) -> int:
        """Fill the prediction cache for the states stored without a prediction while it has room (the
        service does it at start-up, so no request pays the V × D product): one (B × D) x (D × V) product per
        batch. Returns how many."""
        todo = [s for s in states if s.has_prediction and s.pred.size != self.vocab.widths.total]
        done = 0
        for i in range(0, len(todo), batch):
            if self.cache.bytes >= self.cache.max_bytes:
                break
            part = todo[i:i + batch]
            with torch.no_grad():
                pred = self.vocab.predict(torch.from_numpy(np.stack([st.h.astype(np.float32) for st in part])))
            pred = pred.compact()
            for r, st in enumerate(part):
                self.cache.put(st.user_id, _version_key(st), pred.row(r))
            done += len(part)
        return done

    def score(self, feats: dict[str, float]) -> float:
        if self.risk is None:  # no risk model: the deviation itself
            s = feats.get("d_surprisal", float("nan"))
            return float(s) if math.isfinite(s) else float("nan")
        row = np.array([[feats.get(f, np.nan) for f in self.risk.features]], dtype=np.float32)
        return float(self.risk.predict_matrix(row)[0])

    def readable_labels(self) -> list[str]:
        """Every token's readable label, made on first use (60,000 labels take about a second)."""
        if self.labels is None:
            self.labels = self.tok.token_labels()
        return self.labels

    def top_expected(self, state: UserState, k: int = 5) -> list[dict[str, Any]]:
        labels = self.readable_labels()
        return [{"behaviour": labels[int(t)], "p": round(float(p), 6)}
                for t, p in zip(state.top_ids[:k], state.top_p[:k])]

    # -- state ----------------------------------------------------------------------------------------
    def new_state(self, user_id: str) -> UserState:
        f = len(self.tok.field_names)
        return UserState(user_id=user_id, user_idx=int(self.user_index.get(user_id, -1)),
                         model_version=self.model_version, codes=np.zeros((0, f), np.int32))

    def fold(self, state: UserState, records: list[tuple[int, dict]]) -> UserState:
        """The state with logged events (seq, record) appended to its windows (h is not recomputed)."""
        if not records:
            return state
        recs = [r for _, r in records]
        t = np.array([r["time"] for r in recs], np.int64)
        base = len(self.vocab.window_base)
        window = np.array([r["window"] if len(r.get("window") or ()) == base else [np.nan] * base for r in recs],
                          np.float32).reshape(len(recs), base)
        amounts = np.array([float(r["fields"].get(self.amount_field) or 0.0) for r in recs], np.float64)
        times = np.concatenate([state.times, t])
        keep = times > times[-1] - self.spend_days * DAY
        L = self.max_len
        return UserState(
            **{**state.__dict__,
               "tokens": np.concatenate([state.tokens, [r["token"] for r in recs]]).astype(np.int32)[-L:],
               "codes": np.concatenate([state.codes.reshape(-1, len(self.tok.field_names)),
                                        np.array([r["codes"] for r in recs], np.int32)])[-L:],
               "gap": np.concatenate([state.gap, [r["gap"] for r in recs]]).astype(np.int8)[-L:],
               "times": times[keep], "amounts": np.concatenate([state.amounts, amounts])[keep],
               "recent_delta": np.concatenate([self._recent_rows(state), window])[-(max(WINDOW_SIZES) - 1):],
               "n_events": state.n_events + len(recs), "log_seq": max(state.log_seq, records[-1][0]),
               "last_time": int(t[-1])})

    def _batch(self, states: list[UserState], spans: list[tuple[int, int]]) -> Batch:
        """The events [a, b) of each state's tokens / codes / gap, right-padded, with the users' profiles."""
        lens = np.array([b - a for a, b in spans])
        T, F = int(lens.max()), len(self.tok.field_names)
        tokens = np.full((len(states), T), PAD, np.int64)
        codes = np.zeros((len(states), T, F), np.int64)
        gaps = np.zeros((len(states), T), np.int64)
        for r, (s, (a, b)) in enumerate(zip(states, spans)):
            tokens[r, :lens[r]], codes[r, :lens[r]], gaps[r, :lens[r]] = s.tokens[a:b], s.codes[a:b], s.gap[a:b]
        idx = np.array([s.user_idx for s in states])
        known = idx >= 0
        pc = torch.zeros((len(states), self.profile.cat.shape[1]), dtype=self.profile.cat.dtype)
        pn = torch.zeros((len(states), self.profile.num.shape[1]), dtype=self.profile.num.dtype)
        if known.any():
            pc[torch.from_numpy(known)] = self.profile.cat[idx[known]]
            pn[torch.from_numpy(known)] = self.profile.num[idx[known]]
        t = torch.from_numpy(tokens)
        batch = Batch(tokens=t, targets=torch.zeros_like(t), codes=torch.from_numpy(codes),
                      gap_bucket=torch.from_numpy(gaps), profile_cat=pc, profile_num=pn,
                      positives=torch.zeros(len(states), len(states), dtype=torch.bool),
                      users=torch.from_numpy(np.maximum(idx, 0)))
        return batch

    def window_states(self, states: list[UserState]) -> tuple[torch.Tensor, torch.Tensor]:
        """h and the pooled state (B, D) float32 of states with events, from one batched float64 forward pass
        over each state's model window (serve/windows.py), rounded once (as offline)."""
        lens = np.array([window_len(s, self.max_len, self.context) for s in states])
        batch = self._batch(states, [(len(s.tokens) - n, len(s.tokens)) for s, n in zip(states, lens)])
        return final_states(self.model64, batch, lens)

    @torch.no_grad()
    def refresh(self, states: list[UserState], now: float, incremental: bool = True) -> list[UserState]:
        """Recompute h, the pooled state and the predicted distribution of each state from its model window
        (serve/windows.py): extended by its new events when the window is cached (`incremental`, and the
        model has an incremental forward), else one batched float64 forward pass (the refresh worker and
        `embed` call this, never a request)."""
        todo = [i for i, s in enumerate(states) if len(s.tokens)]
        out = list(states)
        if not todo:
            return out
        live = [states[i] for i in todo]
        h, pooled = (self.model_windows.states(live, self._batch) if incremental and self.model_windows is not None
                     else self.window_states(live))
        for i, st in zip(todo, self.predicted(live, h, pooled, now)):
            out[i] = st
        return out

    @torch.no_grad()
    def predicted(self, states: list[UserState], h: torch.Tensor, pooled: torch.Tensor, now: float
                  ) -> list[UserState]:
        """The states with h and the pooled state (B, D) set, the predicted next-event distribution (top-k,
        μ, σ) and the compact prediction the next event's Δ reads (`pred`), all made from h here, off the
        request path."""
        pred = self.vocab.predict(h)
        top_l, top_i = pred.scores.topk(min(TOP_K, pred.scores.shape[1]), dim=1)
        top_p = torch.exp(top_l - pred.log_z.unsqueeze(1))
        v = pred.scores.shape[1]
        sigma = ((pred.sum_sq / v - 1.0 / v ** 2).clamp_min(0)).sqrt()
        packed = self.vocab.pack(pred)
        return [UserState(**{**st.__dict__, "h": h[r].numpy().copy(), "pooled": pooled[r].numpy().copy(),
                             "top_ids": (top_i[r] + N_SPECIAL).numpy().astype(np.int32),
                             "top_p": top_p[r].numpy().astype(np.float32), "mu": 1.0 / v,
                             "sigma": float(sigma[r]), "refreshed_at": now, "model_version": self.model_version,
                             "pred": packed[r].copy()})
                for r, st in enumerate(states)]

__all__ = ["Event", "Scorer", "parse_time"]
