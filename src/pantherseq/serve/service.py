"""The scoring service without the web layer: the request path, the event log, the refresh worker and the
metrics over a store of user states (serve/app.py puts HTTP in front of it; tests use it directly).

The request path (`Service.score`): parse and tokenize, read the state and the logged events not yet folded
into it, compute the features and the score (serve/scorer.py: no transformer pass), append the event to the
user's log in the store — durable before the answer is sent, so a 200 is never lost, even to `kill -9` — and
queue the user for refresh. A background thread folds the queued users' logged events into their states and
recomputes their prediction with one batched forward pass (`Scorer.refresh`), so the next event of the same
user is scored against fresh state; the time from an event's append to the write of its refreshed state is
the refresh lag (`stats`, `/metrics`). A user the store has never seen is a cold start: scored from the
current event alone (no Δ, as a user's first event offline), flagged `cold_start`. `stale` says the
prediction used did not yet include every earlier event of the user (the refresh had not caught up).

On start-up the service rebuilds the terminal history (the run's events before the embedding cut-off, then
every logged event and `/feedback` label) and queues every user whose log is ahead of their state, so a
restart after a crash loses nothing that was answered.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from pantherseq.serve.scorer import Event, Scorer
from pantherseq.serve.state import UserState, decode_event, encode_event
from pantherseq.store import Store

log = logging.getLogger(__name__)
FEEDBACK_LOG = "\x00feedback"  # the store log that keeps /feedback labels (not a user id: starts with NUL)
MAX_BATCH = 1000


class Refresher(threading.Thread):
    """Background worker: folds logged events into states and recomputes predictions, in batches."""

    def __init__(self, service: Service, batch_size: int = 64):
        super().__init__(name="pantherseq-refresh", daemon=True)
        self.service, self.batch_size = service, batch_size
        self.pending: dict[str, float] = {}  # user -> wall time of the oldest un-refreshed append
        self.cond = threading.Condition()
        self.running = True
        self.busy = False
        self.lags: deque[float] = deque(maxlen=100_000)

    def submit(self, user: str, appended_at: float) -> None:
        with self.cond:
            self.pending.setdefault(user, appended_at)
            self.cond.notify()

    def run(self) -> None:
        while self.running:
            with self.cond:
                while self.running and not self.pending:
                    self.cond.wait(0.5)
                take = list(self.pending.items())[: self.batch_size]
                for u, _ in take:
                    del self.pending[u]
                self.busy = bool(take)
            if take:
                try:
                    self.service.refresh_users([u for u, _ in take])
                    now = time.time()
                    for _, t0 in take:
                        self.lags.append(now - t0)
                        self.service.metrics.refresh_lag.observe(now - t0)
                except Exception:  # a failed refresh must not kill the worker: retry later
                    log.exception("refresh failed; re-queued")
                    for u, t0 in take:
                        self.submit(u, t0)
                    time.sleep(0.5)
            with self.cond:
                self.busy = False
                self.cond.notify_all()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until nothing is queued or being refreshed (tests, benchmarks)."""
        end = time.time() + timeout
        with self.cond:
            while self.pending or self.busy:
                if time.time() > end:
                    return False
                self.cond.wait(0.05)
        return True

    def stop(self) -> None:
        with self.cond:
            self.running = False
            self.cond.notify_all()


class Metrics:
    """Prometheus metrics in the service's own registry (several services can live in one process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("pantherseq_requests", "Requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("pantherseq_score_seconds", "Scoring time per transaction",
                                 buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .5), registry=self.registry)
        self.refresh_lag = Histogram("pantherseq_refresh_lag_seconds", "Event append to refreshed state",
                                     buckets=(.01, .05, .1, .25, .5, 1, 2, 5, 10), registry=self.registry)
        self.cold = Counter("pantherseq_cold_start", "Transactions of users without state", registry=self.registry)
        self.queue = Gauge("pantherseq_refresh_queue", "Users waiting for refresh", registry=self.registry)


class Service:
    """The scoring logic behind the HTTP layer (usable without HTTP, e.g. in tests)."""

    def __init__(self, scorer: Scorer, store: Store, refresh: bool = True, refresh_batch: int = 64,
                 warm: bool = True):
        self.scorer, self.store, self.warm = scorer, store, warm
        self.metrics = Metrics()
        self.refresher = Refresher(self, refresh_batch)
        self.refresh_enabled = refresh
        meta = store.get_meta("embed")
        self.embed_meta = json.loads(meta) if meta else {}
        if self.embed_meta.get("model_version") not in (None, scorer.model_version):
            log.warning("the store's states were made by %s, the service runs %s: run `pantherseq embed` again",
                        self.embed_meta.get("model_version"), scorer.model_version)
        self._ids: dict[tuple[str, int], int] = {}
        self._next_id = 0
        self._lock = threading.Lock()

    # -- life cycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        n = self.scorer.load_terminals(self.embed_meta.get("until_s"))
        behind = 0
        states = {}
        users = [u for u in self.store.users_with_log() if u != FEEDBACK_LOG]
        for i in range(0, len(users), 500):
            chunk = users[i:i + 500]
            states.update(zip(chunk, self.store.get_many(chunk)))
        for u in users:
            blob = states[u]
            seq = UserState.decode(blob).log_seq if blob else 0
            ahead = 0
            for s, rec in self.store.events_since(u, 0):  # one read of each log
                self._track(u, s, decode_event(rec))
                ahead += s > seq
            behind += ahead
            if ahead:
                self.refresher.submit(u, time.time())
        for _, rec in self.store.events_since(FEEDBACK_LOG, 0):
            self._apply_feedback(json.loads(rec))
        self.scorer.readable_labels()  # made once, before the first request
        warmed = 0
        if self.warm:  # the run's users, while the cache has room: no request pays the V x D product
            known = list(self.scorer.user_index)
            for i in range(0, len(known), 1000):
                if self.scorer.cache.bytes >= self.scorer.cache.max_bytes:
                    break
                blobs = self.store.get_many(known[i:i + 1000])
                warmed += self.scorer.warm([UserState.decode(b) for b in blobs if b is not None])
        if self.refresh_enabled:
            self.refresher.start()
        log.info("predictions cached for %d users", warmed)
        log.info("service ready: %d terminal events from the run, %d logged events replayed (%d not yet in a "
                 "state)", n, len(self._ids), behind)

    def stop(self) -> None:
        self.refresher.stop()
        if self.refresher.is_alive():
            self.refresher.join(timeout=10)

    def _track(self, user: str, seq: int, rec: dict) -> None:
        """Index a logged event and add it to the terminal history."""
        with self._lock:
            eid = self._next_id
            self._next_id += 1
            self._ids[(user, seq)] = eid
        m = self.scorer.merchant
        if m is not None and rec["fields"].get(m) is not None:
            self.scorer.terminals.add(str(rec["fields"][m]), int(rec["time"]), 0, eid)

    # -- state ----------------------------------------------------------------------------------------
    def current_state(self, user: str) -> tuple[UserState, bool, bool]:
        """(state with every logged event folded in, cold start?, stale prediction?)."""
        blob = self.store.get_many([user])[0]
        state = UserState.decode(blob) if blob else self.scorer.new_state(user)
        pending = [(s, decode_event(b)) for s, b in self.store.events_since(user, state.log_seq)]
        stale = bool(pending) and state.has_prediction
        cold = blob is None and not pending
        return self.scorer.fold(state, pending), cold, stale

    def refresh_users(self, users: list[str]) -> None:
        blobs = self.store.get_many(users)
        states = []
        for u, blob in zip(users, blobs):
            st = UserState.decode(blob) if blob else self.scorer.new_state(u)
            pending = [(s, decode_event(b)) for s, b in self.store.events_since(u, st.log_seq)]
            states.append(self.scorer.fold(st, pending))
        fresh = self.scorer.refresh(states, time.time())
        self.store.put_many({s.user_id: s.encode() for s in fresh})

    # -- scoring --------------------------------------------------------------------------------------
    def score(self, tx: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        user = str(tx["user_id"])
        fields = {k: v for k, v in tx.items() if k not in ("user_id", "timestamp")}
        state, cold, stale = self.current_state(user)
        ev: Event = self.scorer.parse(user, tx["timestamp"], fields, state.last_time)
        feats = self.scorer.features(ev, state)
        score = self.scorer.score(feats)
        seq = self.store.append_event(user, encode_event(ev.record()))  # durable before we answer
        now = time.time()
        self._track(user, seq, ev.record())
        if self.refresh_enabled:
            self.refresher.submit(user, now)
            self.metrics.queue.set(len(self.refresher.pending))
        if cold:
            self.metrics.cold.inc()
        deviation = {k.removeprefix("d_"): _finite(v) for k, v in feats.items() if k.startswith("d_")}
        latency = time.perf_counter() - t0
        self.metrics.latency.observe(latency)
        return {"user_id": user, "score": _finite(score), "deviation": deviation,
                "top_expected": self.scorer.top_expected(state) if state.has_prediction else [],
                "model_version": self.scorer.model_version, "feature_set": self.scorer.feature_set,
                "cold_start": cold, "stale": stale, "event_seq": seq, "latency_ms": round(latency * 1e3, 3)}

    def feedback(self, user: str, seq: int, label: int) -> bool:
        with self._lock:
            known = (user, seq) in self._ids
        if not known:
            return False
        rec = {"user_id": user, "event_seq": seq, "label": int(label)}
        self.store.append_event(FEEDBACK_LOG, json.dumps(rec).encode())
        return self._apply_feedback(rec)

    def _apply_feedback(self, rec: dict) -> bool:
        eid = self._ids.get((rec["user_id"], rec["event_seq"]))
        if eid is None or self.scorer.merchant is None:
            return False
        ev = self.store.events_since(rec["user_id"], rec["event_seq"] - 1)
        if not ev or ev[0][0] != rec["event_seq"]:
            return False
        m = decode_event(ev[0][1])["fields"].get(self.scorer.merchant)
        return m is not None and self.scorer.terminals.set_label(str(m), eid, rec["label"])

    def user_view(self, user: str) -> dict[str, Any]:
        blob = self.store.get_many([user])[0]
        if blob is None and not self.store.events_since(user, 0):
            raise KeyError(user)
        state, _, stale = self.current_state(user)
        labels = self.scorer.readable_labels()
        return {"user_id": user, "user_idx": state.user_idx, "n_events": state.n_events,
                "log_seq": state.log_seq, "last_time": state.last_time, "refreshed_at": state.refreshed_at,
                "model_version": state.model_version, "stale": stale,
                "recent": [labels[int(t)] for t in state.tokens[-10:]],
                "top_expected": self.scorer.top_expected(state) if state.has_prediction else [],
                "mu": _finite(state.mu), "sigma": _finite(state.sigma)}

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """Refresh-lag percentiles over the lags recorded since the last reset (at most the last 100,000)."""
        lags = np.array(self.refresher.lags) if self.refresher.lags else np.zeros(0)
        if reset:
            self.refresher.lags.clear()
        pct = {f"p{q}": float(np.percentile(lags, q)) for q in (50, 95, 99)} if len(lags) else {}
        return {"refresh_lag_s": pct, "refreshed": len(lags), "queue": len(self.refresher.pending),
                "model_version": self.scorer.model_version, "embed": self.embed_meta}


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


__all__ = ["FEEDBACK_LOG", "MAX_BATCH", "Metrics", "Refresher", "Service"]
