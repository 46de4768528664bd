"""The scoring service without the web layer: the request path, the event log, the refresh worker and the
metrics over a store of user states (serve/app.py puts HTTP in front of it; tests use it directly).

The request path (`Service.score`): parse and tokenize, read the state and the logged events not yet folded
into it, refuse an event older than the user's last accepted one (409) and a new user beyond the
new-users-per-minute cap (429), compute the features and the score (serve/scorer.py: no transformer pass),
append the event to the user's log in the store — durable before the answer is sent, so a 200 is never
lost, even to `kill -9` — and queue the user for refresh. The append is a compare-and-append in the store
(`expect_seq`: the last sequence number the check read), so a request of another process for the same user
in between makes this one re-read and re-check: the time order holds across processes; within one process
the user's lock keeps request threads from even trying. A background thread folds the queued
users' logged events into their states and recomputes their prediction with one batched forward pass
(`Scorer.refresh`); the time from an event's append to the write of its refreshed state is the refresh lag
(`stats`, `/metrics`). A user the store has never seen is a cold start: scored from the current event alone
(no Δ, as a user's first event offline), flagged `cold_start`. `stale` says the prediction used did not yet
include every earlier event of the user (the refresh had not caught up).

Horizontal scale: every mutable thing a score reads is in the store — states, logs, the served events at
each terminal with their `/feedback` labels (a time index per terminal, appended in the same step as the
event), the new-user window (`Store.admit`) — so N processes on one store give the scores one process
would. With `external_refresh` the append also queues the user for `pantherseq refresh` worker processes
(serve/refresher.py `run_worker`) instead of the in-process thread.

On start-up the service checks that the store belongs to this run and model (identity.py; `migrate`
recomputes every state with this model), loads the run's terminal history before the embedding cut-off
(read-only, the same in every process), re-indexes every retained logged event and `/feedback` label into
the store's terminal index (idempotent: it repairs stores written before the index) and queues every user
whose log is ahead of their state, so a restart after a crash loses nothing that was answered. Unreadable records (a damaged
state, a log entry that is not an event, a log under an id no request could carry) are skipped and counted
(`stats()["unreadable_records"]`), never fatal; a damaged state is rebuilt from the user's retained log.

Compaction: once a state holds a user's events (seq <= state.log_seq), the log keeps only those the terminal
history still reads (younger than `Scorer.log_horizon_s` before the user's last event) and always the
newest entry; the rest is trimmed at start-up and every `compact_every_s` by the refresh worker, so start-up
replays a bounded window, not the whole history.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import numpy as np

from pantherseq.serve.identity import check_owner, write_owner
from pantherseq.serve.refresher import Metrics, Refresher
from pantherseq.serve.schemas import valid_user_id
from pantherseq.serve.scorer import Event, Scorer
from pantherseq.serve.state import STORED_PREDICTION, StateFormatError, UserState, decode_event, encode_event
from pantherseq.store import Store
from pantherseq.store.base import index_member

log = logging.getLogger(__name__)
FEEDBACK = "feedback"  # the store's internal log of /feedback labels (store.append_internal: no user id reaches it)
NEW_USERS = "new-users"  # the store's admission window of cold starts (Store.admit)
USER_LOCKS = 256  # striped per-user locks: a user's check-and-append runs alone in this process
RETRIES = 20  # compare-and-append attempts against other processes' writes to the same user
SKIPPED_KEPT = 100_000  # damaged records remembered so each is counted once (bounded: a poisoned store)


class Refused(Exception):
    """A request the service does not take: 409 (older than the user's last event), 429 (new-user cap)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


class NewUserLimit:
    """At most `per_minute` new users in any 60 s (0 = no cap), counted in the store: shared by every
    process on it (a user admitted twice, e.g. by two processes racing, counts once)."""

    def __init__(self, store: Store, per_minute: int):
        self.store, self.per_minute = store, int(per_minute)

    def allow(self, user: str, now: float) -> bool:
        return self.per_minute <= 0 or self.store.admit(NEW_USERS, user, now, 60.0, self.per_minute)


class Service:
    """The scoring logic behind the HTTP layer (usable without HTTP, e.g. in tests).

    `score_threads`: the pool the HTTP layer runs scoring in (off the event loop; one by default: scoring is
    Python and small torch ops under the GIL, and four threads contending for it on two cores collapsed the
    throughput, docs/SERVING.md); `max_pending`: requests
    admitted to it at once (more get 503); `new_users_per_minute`: the cold-start cap (0 = none);
    `migrate`: serve a store of another model version of the same run by recomputing its states;
    `external_refresh`: queue refreshes in the store for `pantherseq refresh` workers (no in-process
    refresh thread)."""

    def __init__(self, scorer: Scorer, store: Store, refresh: bool = True, refresh_batch: int = 64,
                 warm: bool = True, *, migrate: bool = False, score_threads: int = 1, max_pending: int = 256,
                 new_users_per_minute: int = 6000, compact_every_s: float = 60.0, external_refresh: bool = False):
        self.scorer, self.store, self.warm, self.migrate = scorer, store, warm, migrate
        self.external_refresh = external_refresh
        refresh = refresh and not external_refresh
        self.metrics = Metrics()
        self.refresher = Refresher(self, refresh_batch, compact_every_s)
        self.refresh_enabled = refresh
        meta = store.get_meta("embed")
        try:
            self.embed_meta = json.loads(meta) if meta else {}
        except ValueError:
            self.embed_meta = {}
        self.pool = ThreadPoolExecutor(max(1, score_threads), thread_name_prefix="pantherseq-score")
        self.max_pending, self.in_flight = int(max_pending), 0
        self.new_users = NewUserLimit(store, new_users_per_minute)
        self.skipped: Counter[str] = Counter()  # unreadable records met, by kind (each logged one once)
        self._skipped_seen: set[tuple] = set()  # the records already counted (`_skip_once`)
        self.trimmed = self.replayed = 0
        self.behind: list[str] = []  # users whose log was ahead of their state at start-up
        self._lock = threading.Lock()
        self._user_locks = [threading.Lock() for _ in range(USER_LOCKS)]

    # -- life cycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        if check_owner(self.store, self.scorer.run_id, self.scorer.model_version, self.migrate):
            self._migrate()
        write_owner(self.store, self.scorer.run_id, self.scorer.model_version)
        n = self.scorer.load_terminals(self.embed_meta.get("until_s"))
        behind = self._replay()
        if self.refresh_enabled:
            for u in self.behind:
                self.refresher.submit(u, time.time())
        self.scorer.readable_labels()  # made once, before the first request
        warmed = 0
        # states embedded before schema 3 carry no prediction: cache the run's users' while the cache has room,
        # so no request pays the V x D product (a schema-3 embed stores one with every state: nothing to read)
        if self.warm and int(self.embed_meta.get("state_schema", 1)) < STORED_PREDICTION:
            known = list(self.scorer.user_index)
            for i in range(0, len(known), 1000):
                if self.scorer.cache.bytes >= self.scorer.cache.max_bytes:
                    break
                chunk = known[i:i + 1000]
                states = [self._decode(u, b, count=False) for u, b in zip(chunk, self.store.get_many(chunk))
                          if b is not None]
                warmed += self.scorer.warm([s for s in states if s is not None])
        if self.refresh_enabled:
            self.refresher.start()
        log.info("predictions cached for %d users", warmed)
        log.info("service ready: %d terminal events from the run, %d logged events replayed (%d not yet in a "
                 "state, %d log entries compacted), unreadable records skipped: %s", n, self.replayed, behind,
                 self.trimmed, dict(self.skipped) or "none")

    def stop(self) -> None:
        self.refresher.stop()
        if self.refresher.is_alive():
            self.refresher.join(timeout=10)
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _migrate(self) -> None:
        """Recompute every stored state's prediction with this model (same run, another model version)."""
        users = sorted(set(self.scorer.user_index) | set(self.store.users_with_log()))
        done = 0
        for i in range(0, len(users), 256):
            chunk = users[i:i + 256]
            have = [u for u, b in zip(chunk, self.store.get_many(chunk)) if b is not None]
            if have:
                self.refresh_users(have)
                done += len(have)
        log.info("migrated %d states to %s", done, self.scorer.model_version)

    def _replay(self) -> int:
        """Re-index every retained logged event (and then every /feedback label) in the store's terminal
        index, note users whose log is ahead of their state (`behind`) and trim what the states hold;
        returns the number of events not yet in a state."""
        users = self.store.users_with_log()
        behind = 0
        for i in range(0, len(users), 500):
            chunk = users[i:i + 500]
            for u, blob in zip(chunk, self.store.get_many(chunk)):
                if not valid_user_id(u):  # e.g. the "\x00feedback" log of earlier versions
                    self._skip("log_id", len(self.store.events_since(u, 0)))
                    continue
                state = (self._decode(u, blob) if blob is not None else None) or self.scorer.new_state(u)
                records = self._read_log(u, 0)
                self._index(u, records)
                self.replayed += len(records)
                ahead = sum(s > state.log_seq for s, _ in records)
                behind += ahead
                if ahead:
                    self.behind.append(u)
                self._trim(u, state, records)
        for _, raw in self.store.internal_since(FEEDBACK, 0):
            try:
                rec = json.loads(raw)
                self._apply_feedback(str(rec["user_id"]), int(rec["event_seq"]), int(rec["label"]))
            except (ValueError, TypeError, KeyError):
                self._skip("feedback")
        return behind

    def _terminal(self, rec: dict) -> str | None:
        """The event's terminal / merchant (the name of its time index in the store), or None."""
        m = self.scorer.merchant
        value = rec["fields"].get(m) if m is not None else None
        return None if value is None else str(value)

    def _index(self, user: str, records: list[tuple[int, dict]]) -> None:
        """Add logged events to their terminals' time indexes in the store (idempotent)."""
        by_terminal: dict[str, list[tuple[str, int]]] = {}
        for s, rec in records:
            term = self._terminal(rec)
            if term is not None:
                by_terminal.setdefault(term, []).append((index_member(user, s), int(rec["time"])))
        for term, items in by_terminal.items():
            self.store.index_add(term, items)

    def terminal_counts(self, terminal: str | None, t: int) -> list[tuple[int, int]] | None:
        """Per terminal window, (served events, labelled frauds) in the store (None: no merchant field)."""
        if self.scorer.merchant is None or terminal is None:
            return None
        return self.store.index_counts(terminal, self.scorer.terminals.ranges(t))

    def terminal_features(self, terminal: str, t: int) -> dict[str, float]:
        """The terminal-risk features an event at `terminal` at time t would get now."""
        return self.scorer.terminals.features(terminal, t, self.terminal_counts(terminal, t))

    def _skip(self, kind: str, n: int = 1) -> None:
        self.skipped[kind] += n
        self.metrics.unreadable.labels(kind).inc(n)

    def _skip_once(self, key: tuple, kind: str) -> None:
        """Count an unreadable stored record once, however often it is read again before it is rebuilt
        or trimmed (up to SKIPPED_KEPT records remembered; past that, re-reads count again)."""
        if key in self._skipped_seen:
            return
        if len(self._skipped_seen) < SKIPPED_KEPT:
            self._skipped_seen.add(key)
        self._skip(kind)

    def _decode(self, user: str, blob: bytes, count: bool = True) -> UserState | None:
        """The stored state, or None (counted, logged) when it is unreadable: it is rebuilt from the log."""
        try:
            return UserState.decode(blob)
        except StateFormatError as e:
            if count:
                log.warning("the state of a user is unreadable (%s): rebuilt from the log", e)
                self._skip_once((user, "state", zlib.crc32(blob)), "state")
            return None

    def _read_log(self, user: str, since: int, last_time: int | None = None) -> list[tuple[int, dict]]:
        """The user's readable logged events after `since`; unreadable ones, and any older than the one
        before (`last_time` first), are skipped and counted: nothing is folded out of time order."""
        return self._pending(user, since, last_time)[0]

    def _pending(self, user: str, since: int, last_time: int | None = None) -> tuple[list[tuple[int, dict]], int]:
        """(`_read_log`, the last sequence number in the log after `since`, readable or not, else `since`)."""
        out, last_seq = [], since
        for s, raw in self.store.events_since(user, since):
            last_seq = s
            try:
                rec = decode_event(raw)
            except StateFormatError:
                self._skip_once((user, s), "event")
                continue
            if last_time is not None and rec["time"] < last_time:
                self._skip_once((user, s), "out_of_order")
                continue
            last_time = rec["time"]
            out.append((s, rec))
        return out, last_seq

    # -- compaction -----------------------------------------------------------------------------------
    def _trim(self, user: str, state: UserState, records: list[tuple[int, dict]]) -> int:
        """Trim the user's log up to the last event the state holds that the terminal history no longer
        reads (older than log_horizon_s before the user's last event)."""
        if state.last_time is None or not state.log_seq:
            return 0
        edge = state.last_time - self.scorer.log_horizon_s
        cut = max((s for s, r in records if s <= state.log_seq and r["time"] < edge), default=0)
        if not cut:
            return 0
        n = self.store.trim_log(user, cut)
        by_terminal: dict[str, list[str]] = {}  # the trimmed events leave the terminal index too
        for s, rec in records:
            term = self._terminal(rec)
            if s <= cut and term is not None:
                by_terminal.setdefault(term, []).append(index_member(user, s))
        for term, members in by_terminal.items():
            self.store.index_remove(term, members)
        with self._lock:
            self.trimmed += n
        return n

    def compact(self, users: list[str]) -> int:
        """Trim the logs of these users to what their stored states do not hold (see the module doc)."""
        n = 0
        for i in range(0, len(users), 500):
            chunk = users[i:i + 500]
            for u, blob in zip(chunk, self.store.get_many(chunk)):
                state = self._decode(u, blob) if blob is not None else None
                if state is not None:
                    n += self._trim(u, state, self._read_log(u, 0))
        return n

    # -- state ----------------------------------------------------------------------------------------
    def current_state(self, user: str) -> tuple[UserState, bool, bool]:
        """(state with every logged event folded in, cold start?, stale prediction?)."""
        return self._current(user)[:3]

    def _current(self, user: str) -> tuple[UserState, bool, bool, int]:
        """`current_state` and the user's last sequence number in the store (what an append expects)."""
        blob = self.store.get_many([user])[0]
        state = (self._decode(user, blob) if blob is not None else None) or self.scorer.new_state(user)
        pending, last_seq = self._pending(user, state.log_seq, state.last_time)
        stale = bool(pending) and state.has_prediction
        cold = blob is None and not pending and not last_seq
        return self.scorer.fold(state, pending), cold, stale, last_seq

    def refresh_users(self, users: list[str]) -> None:
        blobs = self.store.get_many(users)
        states = []
        for u, blob in zip(users, blobs):
            st = (self._decode(u, blob) if blob is not None else None) or self.scorer.new_state(u)
            states.append(self.scorer.fold(st, self._read_log(u, st.log_seq, st.last_time)))
        fresh = self.scorer.refresh(states, time.time())
        # versioned: a slower refresh (another worker) never overwrites a state holding more of the log
        self.store.put_many({s.user_id: s.encode() for s in fresh}, versions={s.user_id: s.log_seq for s in fresh})

    # -- scoring --------------------------------------------------------------------------------------
    def score(self, tx: dict[str, Any]) -> dict[str, Any]:
        """Score one validated transaction and log it; Refused (409, 429) when it is not taken."""
        t0 = time.perf_counter()
        user = str(tx["user_id"])
        fields = {k: v for k, v in tx.items() if k not in ("user_id", "timestamp")}
        with self._user_locks[hash(user) % USER_LOCKS]:
            for _ in range(RETRIES):
                state, cold, stale, last_seq = self._current(user)
                ev: Event = self.scorer.parse(user, tx["timestamp"], fields, state.last_time)
                if state.last_time is not None and ev.time < state.last_time:
                    self.metrics.refused.labels("out_of_order").inc()
                    raise Refused(409, f"event at {ev.dt.isoformat()} is older than this user's last accepted "
                                       f"event at {_iso(state.last_time)}: refused, events are taken in time order")
                if cold and not self.new_users.allow(user, time.time()):
                    self.metrics.refused.labels("new_user_cap").inc()
                    raise Refused(429, f"more than {self.new_users.per_minute} new users in the last minute")
                term = self._terminal(ev.record())
                feats = self.scorer.features(ev, state, self.terminal_counts(term, ev.time))
                score = self.scorer.score(feats)
                seq = self.store.append_event(  # durable before we answer; None: another process came first
                    user, encode_event(self.scorer.record(ev, feats)), expect_seq=last_seq,
                    index=None if term is None else (term, ev.time), queue=self.external_refresh)
                if seq is not None:
                    break
            else:
                self.metrics.refused.labels("contention").inc()
                raise Refused(503, "this user's events are being written by other requests: retry")
        now = time.time()
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

    def score_many(self, txs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Score in order; a refused transaction gets {"user_id", "error": {"status", "detail"}} in its place."""
        out = []
        for tx in txs:
            try:
                out.append(self.score(tx))
            except Refused as e:
                out.append({"user_id": str(tx["user_id"]), "error": {"status": e.status, "detail": e.reason}})
        return out

    def feedback(self, user: str, seq: int, label: int) -> bool:
        """Record a fraud label for the user's logged event `seq` (False: no such event in the log)."""
        ev = self._read_log(user, seq - 1)
        if not ev or ev[0][0] != seq:
            return False
        rec = {"user_id": user, "event_seq": seq, "label": int(label)}
        self.store.append_internal(FEEDBACK, json.dumps(rec).encode())
        self._apply_feedback(user, seq, int(label), ev[0][1])
        return True

    def _apply_feedback(self, user: str, seq: int, label: int, rec: dict | None = None) -> bool:
        """Flag (label 1) or unflag the event in its terminal's index in the store."""
        if rec is None:
            ev = self._read_log(user, seq - 1)
            if not ev or ev[0][0] != seq:
                return False
            rec = ev[0][1]
        term = self._terminal(rec)
        return term is not None and self.store.index_flag(term, index_member(user, seq), label == 1)

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
        """Refresh-lag percentiles over the lags recorded since the last reset (at most the last 100,000),
        the unreadable records skipped at start-up and the log entries compacted. No server paths."""
        lags = np.array(self.refresher.lags) if self.refresher.lags else np.zeros(0)
        if reset:
            self.refresher.lags.clear()
        pct = {f"p{q}": float(np.percentile(lags, q)) for q in (50, 95, 99)} if len(lags) else {}
        embed = {k: v for k, v in self.embed_meta.items() if k != "run"}  # the run's path stays server-side
        return {"refresh_lag_s": pct, "refreshed": len(lags), "queue": len(self.refresher.pending),
                "model_version": self.scorer.model_version, "embed": embed,
                "unreadable_records": dict(self.skipped), "log_entries_compacted": self.trimmed}


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _iso(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).replace(tzinfo=None).isoformat()


__all__ = ["FEEDBACK", "NewUserLimit", "Refused", "Service"]
