"""Scoring one transaction from cached state: the online twin of `pantherseq fraud`'s features.

`OnlineModel(run, model)` loads what the service needs once: the tokenizer, the generative model (used only
by `refresh`, never on the request path), its output head for the Δ, and — when `pantherseq fraud` was run
for this model — the risk model, its feature list and the embedding PCA. `score` computes, for one event:

- ψ context: amount, hour, weekend, night, the low-cardinality fields' codes   (fraud/features.py)
- customer spending over 1/7/30 days, the current event included              (`customer_window`)
- terminal risk over (t − delay − w, t − delay]                                (`TerminalHistory`)
- Δ from the cached h: one (D × V) product and the same `deviation_features` as offline
- e_u and h projected by the same PCA as offline (`pipeline.project`)

and scores them with the saved LightGBM risk model. A run without a risk model (MovieLens, or `fraud` not
run) is scored by the deviation itself: the score is the surprisal −log P(x_new).

Offline/online parity: offline, the features of event j come from the window [w0, j) of `scoring_windows`,
which holds between `context` + 1 and max_len events; online, h is computed on the last max_len events. With
`context = max_len − 1` in the fraud config the two windows are the same and the scores agree to float
tolerance (tests/serve/test_service.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from pantherseq.config import build_config, load_toml
from pantherseq.data.dataset import Profile, gap_bucket_one
from pantherseq.data.schema import GAP, LABEL, TIME, USER, DatasetConfig
from pantherseq.errors import ConfigError
from pantherseq.fraud.behaviour import DeviationVocab
from pantherseq.fraud.deviation import DELTA_NAMES, HeadStats, deviation_from_stats, head_stats
from pantherseq.fraud.features import DAY
from pantherseq.fraud.pipeline import MERCHANT_FIELDS, project
from pantherseq.model.base import PAD, Batch, NeuralModel
from pantherseq.serve.state import UserState
from pantherseq.tokenizer import N_SPECIAL, UNK, StructuredTokenizer
from pantherseq.train.checkpoint import load_model

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


class TerminalHistory:
    """Every event at each terminal / merchant (time, fraud label), for the delayed terminal-risk features:
    transactions, frauds and rate over (t − delay − w, t − delay]. Loaded from the run's events before the
    embedding cut-off, then grown with the served events (label unknown = 0 until `/feedback`)."""

    def __init__(self, windows: list[int], delay_days: int):
        self.windows, self.lag = [int(w) * DAY for w in windows], int(delay_days) * DAY
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

    def features(self, terminal: str | None, t: int) -> dict[str, float]:
        times = self._times.get(terminal) if terminal is not None else None
        out = {}
        for w_days, w in zip((w // DAY for w in self.windows), self.windows):
            if times is None:
                n = f = 0.0
            else:
                hi = int(np.searchsorted(times, t - self.lag, side="right"))
                lo = int(np.searchsorted(times, t - self.lag - w, side="right"))
                n, f = float(hi - lo), float(self._labels[terminal][lo:hi].astype(np.int64).sum())
            out[f"term_n_{w_days}d"], out[f"term_frauds_{w_days}d"] = n, f
            out[f"term_rate_{w_days}d"] = f / max(n, 1.0)
        return out


def customer_window(times: np.ndarray, amounts: np.ndarray, t: int, amount: float, windows: list[int]
                    ) -> dict[str, float]:
    """Count and mean amount of the customer's events in (t − w days, t], the current one included (the
    previous events all come before it in time order, as offline)."""
    out = {}
    for w in windows:
        keep = times > t - w * DAY
        n = float(keep.sum()) + 1.0
        s = float(amounts[keep].astype(np.float64).sum()) + amount
        out[f"cust_n_{w}d"], out[f"cust_mean_amount_{w}d"] = n, s / max(n, 1.0)
    return out


class OnlineModel:
    """A run's model, tokenizer and (optional) risk model, ready to score single events (see module doc)."""

    def __init__(self, run: str | Path, model_name: str, fraud_dir: str | Path | None = None,
                 feature_set: str = "hybrid", threads: int = 1, cache_users: int = 10_000):
        self.run = Path(run)
        if not (self.run / "prepare.json").is_file():
            raise ConfigError(f"{self.run} is not a prepared run directory (no prepare.json)")
        torch.set_num_threads(threads)
        self.cfg = build_config(DatasetConfig, load_toml(self.run / "config.toml"), "config.toml")
        self.tok = StructuredTokenizer.load(self.run / "tokenizer.json")
        model, _ = load_model(self.run, model_name)
        if not isinstance(model, NeuralModel):
            raise ConfigError(f"model {model_name!r} is a count model: serving needs a neural model")
        self.model = model.eval()
        self.model_name = model_name
        digest = hashlib.sha256(Path(self.run / "models" / model_name / "checkpoint.pt").read_bytes()).hexdigest()
        self.model_version = f"{model_name}@{digest[:12]}"
        self.max_len = int(model.cfg.max_len)
        self.vocab = DeviationVocab(self.tok)
        self._ordered_sizes = {f: len(self.vocab.member_index[f]) for f in self.vocab.ordered_codes}
        # per user, the HeadStats of the current prediction (LRU; 240 KB per user at V = 60,000)
        self.cache_users = cache_users
        self._cache: OrderedDict[str, tuple[tuple, HeadStats]] = OrderedDict()
        self._cache_lock = threading.Lock()
        # the Δ names, in the order `deviation_from_stats` gives them (a cold start gets them all NaN)
        self.delta_names = [f"d_{k}" for k in (*DELTA_NAMES, *(f"surprisal_{n}" for n in self.vocab.token_fields),
                                                *(f"tail_{self.vocab.token_fields[f]}" for f in self.vocab.ordered_codes))]
        with torch.no_grad():  # the output head over the regular tokens, for the Δ on the request path
            self.W = model.output_weight[N_SPECIAL:].detach().float().numpy().copy()
            self.b = model.out_bias[N_SPECIAL:].detach().float().numpy().copy()
        self.input_fields = [f.name for f in self.cfg.fields if getattr(f, "derive", None) is None]
        self.kinds = {f.name: f.kind for f in self.cfg.fields}
        self.code_cols = self.vocab.code_cols
        self.labels = None  # readable token labels, made on first use
        users = pl.read_parquet(self.run / "users.parquet")
        self.user_index = dict(zip(users[USER].cast(pl.Utf8).to_list(), users["user_idx"].to_list()))
        ppath = self.run / "profile.parquet"
        self.profile = (Profile.from_frame(pl.read_parquet(ppath).sort("user_idx"), self.cfg)
                        if ppath.is_file() and self.cfg.profile.fields else Profile.empty(len(users)))
        self._load_risk(Path(fraud_dir) if fraud_dir else self.run / "fraud", feature_set)

    # -- set-up ---------------------------------------------------------------------------------------
    def _load_risk(self, fraud_dir: Path, feature_set: str) -> None:
        self.risk = None
        self.feature_set = None
        report_path = fraud_dir / "fraud.json"
        fc: dict[str, Any] = {}
        if report_path.is_file():
            report = json.loads(report_path.read_text())
            fc = report["config"]
            if report.get("model") != self.model_name:
                raise ConfigError(f"{report_path} was made with model {report.get('model')!r}, not "
                                  f"{self.model_name!r}: re-run `pantherseq fraud` or give --fraud-dir")
            path = fraud_dir / f"risk_model_{feature_set.replace('+', '_')}.txt"
            if not path.is_file():
                raise ConfigError(f"no risk model for feature set {feature_set!r} in {fraud_dir}")
            import lightgbm

            self.risk = lightgbm.Booster(model_file=str(path))
            self.risk_features = json.loads(path.with_suffix(".json").read_text())["features"]
            pca = np.load(fraud_dir / "embedding_pca.npz")
            self.pca = {k: pca[k] for k in pca.files}
            self.feature_set = feature_set
            self.merchant = next((f for f in [fc.get("merchant_field"), *MERCHANT_FIELDS]
                                  if f and f in self.kinds), None)
            self.categorical = [c.removeprefix("ctx_") for c in report.get("categorical", [])]
        else:
            self.merchant = next((f for f in MERCHANT_FIELDS if f in self.kinds), None)
            self.categorical = []
        self.amount_field = fc.get("amount_field", "amount")
        self.windows = [int(w) for w in fc.get("windows", [1, 7, 30])]
        self.delay_days = int(fc.get("delay_days", 7))
        self.spend_days = max(self.windows)
        self.terminals = TerminalHistory(self.windows, self.delay_days)

    def load_terminals(self, until: int | None) -> int:
        """Fill the terminal history from the run's events before `until` (unix s); returns the count."""
        if self.merchant is None:
            return 0
        ev = pl.read_parquet(self.run / "events.parquet", columns=[self.merchant, TIME, LABEL]
                             if LABEL in pl.read_parquet_schema(self.run / "events.parquet") else [self.merchant, TIME])
        secs = ev[TIME].dt.epoch("us").to_numpy() // 1_000_000
        keep = secs < until if until is not None else np.ones(len(secs), bool)
        labels = (ev[LABEL].fill_null(0).cast(pl.Int64).to_numpy() == 1) if LABEL in ev.columns else \
            np.zeros(len(secs), bool)
        self.terminals.load(ev[self.merchant].cast(pl.Utf8).fill_null("").to_numpy()[keep], secs[keep],
                            labels[keep].astype(np.int8))
        return int(keep.sum())

    # -- request path ---------------------------------------------------------------------------------
    def parse(self, user_id: str, when: Any, fields: dict[str, Any], last_time: int | None) -> Event:
        t, dt = parse_time(when)
        gap_s = None if last_time is None else float(t - last_time)
        raw = {**fields, TIME: dt, GAP: gap_s}
        token, codes = self.tok.encode_one(raw)
        gap = gap_bucket_one(gap_s)
        return Event(user_id, t, dt, fields, int(token), [int(c) for c in codes], gap)

    def features(self, ev: Event, state: UserState) -> dict[str, float]:
        """Every feature of the risk model for `ev` given the user's state (events before it folded in)."""
        amount = float(ev.fields.get(self.amount_field) or 0.0)
        hour = ev.dt.hour
        out: dict[str, float] = {
            "amount": amount, "hour": float(np.float32(hour + ev.dt.minute / 60.0)),
            "weekend": float(ev.dt.isoweekday() >= 6), "night": float(hour < 6),
        }
        names = self.tok.field_names
        for c in self.categorical:
            out[f"ctx_{c}"] = float(ev.codes[names.index(c)])
        out |= customer_window(state.times, state.amounts, ev.time, amount, self.windows)
        if self.merchant is not None:
            m = ev.fields.get(self.merchant)
            out |= self.terminals.features(None if m is None else str(m), ev.time)
        out |= self.deviation(ev, state)
        d = self.model.cfg.d_model
        for name, vec in (("eu", state.e_u), ("rec", state.h)):
            x = vec.reshape(1, -1) if vec.size else np.full((1, d), np.nan, np.float32)
            if self.risk is not None:
                x = project(x, self.pca[f"{name}_mean"], self.pca[f"{name}_comps"])
            out.update({f"{name}_{i}": float(v) for i, v in enumerate(x[0])})
        return out

    def deviation(self, ev: Event, state: UserState) -> dict[str, float]:
        """Δ of the event against the cached prediction h (NaN for a user with no history, as offline), from
        the prediction's `HeadStats` (cached per user by the refresh; on a miss one V × D product and a few
        passes over V) — tested equal to the batched Δ."""
        if not state.has_prediction:
            return dict.fromkeys(self.delta_names, float("nan"))
        h = state.h.astype(np.float32)
        stats = self.head_stats(state, h)
        obs = ev.token - N_SPECIAL if ev.token >= N_SPECIAL else -1
        feats = deviation_from_stats(stats, h, self.W, obs, [ev.codes[c] for c in self.code_cols],
                                     self.vocab.member_index, self.vocab.token_fields)
        return {f"d_{k}": v for k, v in feats.items()}

    def _stats(self, logits: np.ndarray) -> HeadStats:
        return head_stats(logits, self.vocab.ordered_codes, self._ordered_sizes)

    def head_stats(self, state: UserState, h: np.ndarray) -> HeadStats:
        key = (state.refreshed_at, state.n_events, state.log_seq)
        with self._cache_lock:
            hit = self._cache.get(state.user_id)
            if hit is not None and hit[0] == key:
                self._cache.move_to_end(state.user_id)
                return hit[1]
        stats = self._stats(self.W @ h + self.b)
        if state.has_prediction:
            self._remember(state.user_id, key, stats)
        return stats

    def warm(self, states: list[UserState], batch: int = 256) -> int:
        """Fill the head-statistics cache for these states (one (B × D) x (D × V) product per batch); the
        service does it at start-up so that no request pays the V × D product. Returns how many."""
        done = 0
        states = [s for s in states if s.has_prediction][: self.cache_users]
        for i in range(0, len(states), batch):
            part = states[i:i + batch]
            logits = np.stack([s.h.astype(np.float32) for s in part]) @ self.W.T + self.b
            for s, row in zip(part, logits):
                self._remember(s.user_id, (s.refreshed_at, s.n_events, s.log_seq), self._stats(row))
            done += len(part)
        return done

    def _remember(self, user: str, key: tuple, stats: HeadStats) -> None:
        with self._cache_lock:
            self._cache[user] = (key, stats)
            self._cache.move_to_end(user)
            while len(self._cache) > self.cache_users:
                self._cache.popitem(last=False)

    def score(self, feats: dict[str, float]) -> float:
        if self.risk is None:  # no risk model: the deviation itself
            s = feats.get("d_surprisal", float("nan"))
            return float(s) if math.isfinite(s) else float("nan")
        row = np.array([[feats.get(f, np.nan) for f in self.risk_features]], dtype=np.float32)
        return float(self.risk.predict(row, num_threads=1)[0])

    def readable_labels(self) -> list[str]:
        """Every token's readable label, made on first use (60,000 labels take about a second)."""
        if self.labels is None:
            self.labels = self.tok.token_labels()
        return self.labels

    def top_expected(self, state: UserState, k: int = 5) -> list[dict[str, Any]]:
        self.readable_labels()
        return [{"behaviour": self.labels[int(t)], "p": round(float(p), 6)}
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
               "n_events": state.n_events + len(recs), "log_seq": max(state.log_seq, records[-1][0]),
               "last_time": int(t[-1])})

    @torch.no_grad()
    def refresh(self, states: list[UserState], now: float, cache: bool = True) -> list[UserState]:
        """Recompute h, e_u and the predicted distribution of each state from its last max_len events:
        one batched forward pass (the background worker and `embed` call this, never a request)."""
        todo = [i for i, s in enumerate(states) if len(s.tokens)]
        out = list(states)
        if not todo:
            return out
        lens = np.array([len(states[i].tokens) for i in todo])
        T, F = int(lens.max()), len(self.tok.field_names)
        tokens = np.full((len(todo), T), PAD, np.int64)
        codes = np.zeros((len(todo), T, F), np.int64)
        gaps = np.zeros((len(todo), T), np.int64)
        for r, i in enumerate(todo):
            s = states[i]
            tokens[r, :lens[r]], codes[r, :lens[r]], gaps[r, :lens[r]] = s.tokens, s.codes, s.gap
        idx = np.array([states[i].user_idx for i in todo])
        known = idx >= 0
        pc = torch.zeros((len(todo), self.profile.cat.shape[1]), dtype=self.profile.cat.dtype)
        pn = torch.zeros((len(todo), self.profile.num.shape[1]), dtype=self.profile.num.dtype)
        if known.any():
            pc[torch.from_numpy(known)] = self.profile.cat[idx[known]]
            pn[torch.from_numpy(known)] = self.profile.num[idx[known]]
        batch = Batch(tokens=torch.from_numpy(tokens), targets=torch.zeros_like(torch.from_numpy(tokens)),
                      codes=torch.from_numpy(codes), gap_bucket=torch.from_numpy(gaps), profile_cat=pc,
                      profile_num=pn, positives=torch.zeros(len(todo), len(todo), dtype=torch.bool),
                      users=torch.from_numpy(np.maximum(idx, 0)))
        hid = self.model.hidden(batch)  # (B, T, D)
        rows = torch.arange(len(todo))
        last = hid[rows, torch.from_numpy(lens - 1)]
        e_u = torch.stack([hid[r, :lens[r]].mean(0) for r in range(len(todo))])
        logits = self.model.logits(last)[:, N_SPECIAL:].float()
        p = torch.softmax(logits, dim=1)
        top_p, top_i = p.topk(min(TOP_K, p.shape[1]), dim=1)
        v = p.shape[1]
        sigma = ((p.square().sum(1) / v - 1.0 / v ** 2).clamp_min(0)).sqrt()
        logits_np = logits.numpy()
        for r, i in enumerate(todo):
            out[i] = UserState(**{**states[i].__dict__, "h": last[r].numpy().astype(np.float32),
                                  "e_u": e_u[r].numpy().astype(np.float32),
                                  "top_ids": (top_i[r] + N_SPECIAL).numpy().astype(np.int32),
                                  "top_p": top_p[r].numpy().astype(np.float32), "mu": 1.0 / v,
                                  "sigma": float(sigma[r]), "refreshed_at": now,
                                  "model_version": self.model_version})
            if cache:  # the next event's Δ will need these: computed here, off the request path
                st = out[i]
                self._remember(st.user_id, (st.refreshed_at, st.n_events, st.log_seq), self._stats(logits_np[r]))
        return out


__all__ = ["UNK", "Event", "OnlineModel", "TerminalHistory", "customer_window", "parse_time"]
