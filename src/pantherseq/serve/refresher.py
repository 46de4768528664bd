"""The service's background refresh worker and its Prometheus metrics (serve/service.py uses both).

`Refresher` takes queued users in batches of `batch_size`, has the service fold their logged events into
their states and recompute their predictions (`Service.refresh_users`: one batched forward pass), records
each event's refresh lag, and every `compact_every_s` has the service trim the logs of the users it
refreshed (`Service.compact`).

`run_worker` is the same work in a process of its own (`pantherseq refresh`, or started by
`serve --workers N`): it takes users from the store's refresh queue (Redis: a stream read by the consumer
group `refresh`, so several workers share it; SQLite: a polled table), refreshes them, acknowledges the
entries and compacts; the scorer processes then run with `external_refresh` and no refresh thread. An
entry is acknowledged only after its state is written, so a worker killed mid-batch loses nothing: the
entries are claimed again after RECLAIM_S (store/base.py). Two workers refreshing one user cannot move
its state backwards (the write is versioned by log_seq).

Lingering. A worker that claimed fewer than `batch_size` entries waits `linger_s` (default 0.1 s) before it
claims again, so that the next forward pass takes the users queued meanwhile instead of one or two: at 200
events/s a claim otherwise returns one entry, and every batch costs a forward pass and three write
transactions (claim, state, acknowledge) that the scorers' writes queue behind. It adds at most `linger_s`
to the refresh lag (whose budget is a second); `linger_s = 0` claims at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pantherseq.serve.service import Service

log = logging.getLogger(__name__)


class Refresher(threading.Thread):
    """Background worker: folds logged events into states and recomputes predictions, in batches; every
    `compact_every_s` it trims the logs of the users it refreshed (Service.compact)."""

    def __init__(self, service: Service, batch_size: int = 64, compact_every_s: float = 60.0):
        super().__init__(name="pantherseq-refresh", daemon=True)
        self.service, self.batch_size, self.compact_every_s = service, batch_size, compact_every_s
        self.pending: dict[str, float] = {}  # user -> wall time of the oldest un-refreshed append
        self.cond = threading.Condition()
        self.running = True
        self.busy = False
        self.lags: deque[float] = deque(maxlen=100_000)
        self.to_compact: set[str] = set()
        self.compacted_at = time.time()

    def submit(self, user: str, appended_at: float) -> None:
        with self.cond:
            self.pending.setdefault(user, appended_at)
            self.cond.notify()

    def run(self) -> None:
        while self.running:
            with self.cond:
                while self.running and not self.pending and not self._compaction_due():
                    self.cond.wait(0.5)
                take = list(self.pending.items())[: self.batch_size]
                for u, _ in take:
                    del self.pending[u]
                self.busy = bool(take)
            if take:
                self._refresh(take)
            if self._compaction_due():
                users, self.to_compact = sorted(self.to_compact), set()
                self.compacted_at = time.time()
                try:
                    self.service.compact(users)
                except Exception:  # compaction is housekeeping: the next round retries
                    log.exception("log compaction failed")
            with self.cond:
                self.busy = False
                self.cond.notify_all()

    def _compaction_due(self) -> bool:
        return bool(self.to_compact) and time.time() - self.compacted_at >= self.compact_every_s

    def _refresh(self, take: list[tuple[str, float]]) -> None:
        try:
            self.service.refresh_users([u for u, _ in take])
            now = time.time()
            for u, t0 in take:
                self.lags.append(now - t0)
                self.service.metrics.refresh_lag.observe(now - t0)
                self.to_compact.add(u)
        except Exception:  # a failed refresh must not kill the worker: retry later
            log.exception("refresh failed; re-queued")
            for u, t0 in take:
                self.submit(u, t0)
            time.sleep(0.5)

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


def run_worker(service: Service, consumer: str, stop: threading.Event, batch_size: int = 64,
               report_every_s: float = 30.0, linger_s: float = 0.1) -> int:
    """Refresh queued users until `stop` is set; returns how many queue entries were handled. The service
    must have been started (identity checked; `service.behind`, the users left behind by a crash, are
    refreshed first). After a batch of fewer than `batch_size` entries the worker waits `linger_s` (module
    doc)."""
    done, lags, reported = 0, deque(maxlen=100_000), time.time()
    todo = list(service.behind)
    for i in range(0, len(todo), batch_size):
        service.refresh_users(todo[i:i + batch_size])
    to_compact: set[str] = set(todo)
    compacted_at = time.time()
    while not stop.is_set():
        entries = service.store.claim_refresh(consumer, batch_size, 0.5)
        if entries:
            first: dict[str, float] = {}
            for _, user, at in entries:
                first[user] = min(at, first.get(user, at))
            try:
                service.refresh_users(list(first))
            except Exception:  # not acknowledged: claimed again after RECLAIM_S
                log.exception("refresh failed; the entries will be claimed again")
                time.sleep(0.5)
                continue
            service.store.ack_refresh([i for i, _, _ in entries])
            now = time.time()
            for user, at in first.items():
                lags.append(now - at)
                service.metrics.refresh_lag.observe(now - at)
            to_compact |= set(first)
            done += len(entries)
            if len(entries) < batch_size and linger_s > 0:
                stop.wait(linger_s)
        if to_compact and time.time() - compacted_at >= service.refresher.compact_every_s:
            users, to_compact, compacted_at = sorted(to_compact), set(), time.time()
            try:
                service.compact(users)
            except Exception:  # housekeeping: the next round retries
                log.exception("log compaction failed")
        if lags and time.time() - reported >= report_every_s:
            p = sorted(lags)
            log.info("refreshed %d queue entries; lag p50 %.3f s, p99 %.3f s", done, p[len(p) // 2],
                     p[min(len(p) - 1, int(len(p) * 0.99))])
            reported = time.time()
    return done


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
        self.refused = Counter("pantherseq_refused", "Transactions refused, by reason", ["reason"],
                               registry=self.registry)
        self.unreadable = Counter("pantherseq_unreadable_records", "Stored records skipped as unreadable",
                                  ["kind"], registry=self.registry)


__all__ = ["Metrics", "Refresher", "run_worker"]
