"""The refresh worker's loop (`run_worker`): a batch smaller than `batch_size` makes it linger, so the next
forward pass takes the users queued meanwhile. Time is simulated: waiting enqueues events, nothing sleeps."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from pantherseq.serve.refresher import run_worker


class Queue:
    """A store's refresh queue: claim takes up to `count` entries, ack forgets them."""

    def __init__(self):
        self.entries: list[tuple[str, str, float]] = []
        self.acked: list[str] = []
        self.next_id = 0

    def push(self, n: int) -> None:
        for _ in range(n):
            self.entries.append((str(self.next_id), f"u{self.next_id}", 0.0))
            self.next_id += 1

    def claim_refresh(self, consumer: str, count: int, block_s: float):
        taken, self.entries = self.entries[:count], self.entries[count:]
        return taken

    def ack_refresh(self, ids):
        self.acked.extend(ids)


class Clock(threading.Event):
    """`stop` for run_worker: each wait(t) is time passing, during which `per_wait` events are queued; set
    after `waits` waits."""

    def __init__(self, queue: Queue, per_wait: int, waits: int):
        super().__init__()
        self.queue, self.per_wait, self.left, self.waited = queue, per_wait, waits, []

    def wait(self, timeout=None):
        self.waited.append(timeout)
        self.queue.push(self.per_wait)
        self.left -= 1
        if self.left <= 0:
            self.set()
        return self.is_set()


def _service(queue: Queue, batches: list[list[str]]):
    observe = SimpleNamespace(observe=lambda _: None)
    return SimpleNamespace(behind=[], store=queue, refresh_users=batches.append,
                           metrics=SimpleNamespace(refresh_lag=observe),
                           refresher=SimpleNamespace(compact_every_s=1e9), compact=lambda users: None)


def test_a_short_batch_lingers_and_the_next_takes_what_queued_meanwhile():
    queue, batches = Queue(), []
    queue.push(1)
    stop = Clock(queue, per_wait=3, waits=3)
    done = run_worker(_service(queue, batches), "w", stop, batch_size=8, linger_s=0.1)
    assert [len(b) for b in batches] == [1, 3, 3]  # one user, then each linger's three
    assert stop.waited == [0.1, 0.1, 0.1]
    assert done == 7 and queue.acked == [str(i) for i in range(7)]


def test_a_full_batch_claims_again_at_once():
    queue, batches = Queue(), []
    queue.push(10)
    stop = Clock(queue, per_wait=0, waits=1)
    run_worker(_service(queue, batches), "w", stop, batch_size=4, linger_s=0.1)
    assert [len(b) for b in batches] == [4, 4, 2]  # the full batches did not wait; the short one did
    assert stop.waited == [0.1]


def test_linger_zero_never_waits():
    queue, batches = Queue(), []
    queue.push(3)
    stop = Clock(queue, per_wait=0, waits=1)
    original = queue.claim_refresh

    def claim(consumer, count, block_s):  # the store's own poll blocks; here: stop once the queue is empty
        taken = original(consumer, count, block_s)
        if not taken:
            stop.set()
        return taken

    queue.claim_refresh = claim
    run_worker(_service(queue, batches), "w", stop, batch_size=2, linger_s=0.0)
    assert [len(b) for b in batches] == [2, 1] and stop.waited == []
