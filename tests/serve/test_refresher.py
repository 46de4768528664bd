"""The refresh worker's loop (`run_worker`): a batch smaller than `batch_size` makes it linger, so the next
forward pass takes the users queued meanwhile. Time is simulated: waiting enqueues events, nothing sleeps,
and an empty queue stops the worker (so a worker that never lingers ends, and fails, instead of spinning)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from pantherseq.serve.refresher import run_worker


class Clock(threading.Event):
    """`stop` for run_worker, and the store's refresh queue: each wait(t) is time passing, during which
    `per_wait` events are queued; set after `waits` waits, or when a claim finds the queue empty."""

    def __init__(self, queued: int, per_wait: int, waits: int):
        super().__init__()
        self.entries: list[tuple[str, str, float]] = []
        self.acked: list[str] = []
        self.per_wait, self.left, self.waited = per_wait, waits, []
        self.push(queued)

    def push(self, n: int) -> None:
        start = len(self.acked) + len(self.entries)
        self.entries += [(str(i), f"u{i}", 0.0) for i in range(start, start + n)]

    def wait(self, timeout=None):
        self.waited.append(timeout)
        self.push(self.per_wait)
        self.left -= 1
        if self.left <= 0:
            self.set()
        return self.is_set()

    def claim_refresh(self, consumer: str, count: int, block_s: float):
        taken, self.entries = self.entries[:count], self.entries[count:]
        if not taken:  # the real stores block here for block_s; the test ends instead
            self.set()
        return taken

    def ack_refresh(self, ids):
        self.acked.extend(ids)


def _run(clock: Clock, batch_size: int, linger_s: float) -> tuple[list[int], int]:
    """(the batch sizes refreshed, the entries handled) by run_worker on `clock`'s queue."""
    batches: list[list[str]] = []
    service = SimpleNamespace(behind=[], store=clock, refresh_users=batches.append,
                              metrics=SimpleNamespace(refresh_lag=SimpleNamespace(observe=lambda _: None)),
                              refresher=SimpleNamespace(compact_every_s=1e9), compact=lambda users: None)
    done = run_worker(service, "w", clock, batch_size=batch_size, linger_s=linger_s)
    return [len(b) for b in batches], done


def test_a_short_batch_lingers_and_the_next_takes_what_queued_meanwhile():
    clock = Clock(queued=1, per_wait=3, waits=3)
    sizes, done = _run(clock, batch_size=8, linger_s=0.1)
    assert sizes == [1, 3, 3]  # one user, then each linger's three
    assert clock.waited == [0.1, 0.1, 0.1]
    assert done == 7 and clock.acked == [str(i) for i in range(7)]


def test_a_full_batch_claims_again_at_once():
    clock = Clock(queued=10, per_wait=0, waits=1)
    sizes, _ = _run(clock, batch_size=4, linger_s=0.1)
    assert sizes == [4, 4, 2]  # the full batches did not wait; the short one did
    assert clock.waited == [0.1]


def test_linger_zero_never_waits():
    clock = Clock(queued=3, per_wait=0, waits=1)
    sizes, _ = _run(clock, batch_size=2, linger_s=0.0)
    assert sizes == [2, 1] and clock.waited == []
