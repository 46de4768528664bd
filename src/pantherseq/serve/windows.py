"""The refresh's incremental update: each user's model window, kept between refreshes, extended by the events
logged since instead of recomputed (issue 14: "a KV cache or an equivalent one-step state update").

The window. The state after a user's n events (h, the pooled state) is computed from the window of their
last n − window_start(n) events (fraud/behaviour.py): it grows one event at a time to max_len events, then
restarts at the last context + 1 and grows again, every chunk = max_len − context events, on a grid counted
from the user's first event (`UserState.n_events`). These are the offline pass's windows, so the served
states equal the offline ones for any `context` of the fraud config, and a window that only grows can be
extended: positions are absolute (model/incremental.py), a sliding window could not. With
context = max_len − 1 (the parity test's setting) the window slides by one event at every event and every
refresh is a full forward, as before.

The cache. Per user a `Window`: the model's `WindowCache` (per block the keys and values of the window's
positions and SPRM's last 8 normalised inputs, float64 as the model copy the refresh runs: about
n_layers · 2 · max_len · D · 8 bytes, 256 KiB for the default model at max_len = 128), the inputs it was
computed from, the state after its last event and the sum of its states (the pooled state). It lives in the
memory of the process that refreshes — the service's refresh thread, or each `pantherseq refresh` worker —
in an LRU bounded in bytes (`Scorer(window_cache_mb=...)`, 512 MB by default), never in the store, which
stays as it was. A refresh extends a cached window only when it is the state's window so far: the same
start, the same profile row, the same inputs (compared, not trusted). Anything else — a user not cached or
evicted, a re-base, a state another worker refreshed meanwhile, a restart — computes the window afresh, in
one batched forward over the users that missed: a miss costs the full forward of before, never a different
state. Extending costs a forward over the new events only (1 per event at the refresh's pace), attending to
up to max_len cached positions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pantherseq.fraud.behaviour import window_start
from pantherseq.model.base import Batch, NeuralModel
from pantherseq.model.incremental import WindowCache, extend, supports
from pantherseq.serve.cache import LruCache
from pantherseq.serve.state import UserState

log = logging.getLogger(__name__)

# (states, spans) -> one Batch of the events [a, b) of each state's tokens / codes / gap, right-padded
BatchFn = Callable[[list[UserState], list[tuple[int, int]]], Batch]


@dataclass
class Window:
    """One user's window as of the last refresh: what extending it reads (module doc)."""

    start: int  # the user's event the window starts at (0 = their first)
    user_idx: int  # the profile row its states were computed with
    tokens: np.ndarray  # (n,) int32: the window's events, what `cache` was computed from
    codes: np.ndarray  # (n, F) int32
    gap: np.ndarray  # (n,) int8
    cache: WindowCache
    last: torch.Tensor  # (D,) float64: the state after the window's last event
    total: torch.Tensor  # (D,) float64: the sum of the window's states, in order

    @property
    def nbytes(self) -> int:
        return (self.cache.nbytes + self.tokens.nbytes + self.codes.nbytes + self.gap.nbytes
                + 8 * (self.last.nelement() + self.total.nelement()))

    def holds(self, tokens: np.ndarray, codes: np.ndarray, gap: np.ndarray) -> bool:
        """Whether the window's events are the first of these (the state's window)."""
        n = len(self.tokens)
        return (n <= len(tokens) and np.array_equal(self.tokens, tokens[:n]) and np.array_equal(self.codes, codes[:n])
                and np.array_equal(self.gap, gap[:n]))


def window_len(state: UserState, max_len: int, context: int) -> int:
    """How many of the state's last events its model window holds (all of them without an event count)."""
    n = state.n_events
    return min(len(state.tokens), n - window_start(n, max_len, context)) if n > 0 else len(state.tokens)


class Windows:
    """Per user, the model window of the last refresh, in an LRU of `max_bytes`; `states` computes h and the
    pooled state of states from them (module doc). `hits`, `misses`: users extended / computed afresh."""

    def __init__(self, model64: NeuralModel, context: int, max_bytes: int):
        if not supports(model64):
            raise ValueError(f"{type(model64).__name__} has no incremental forward (model/incremental.py)")
        self.model64, self.context = model64, int(context)
        self.max_len = int(model64.cfg.max_len)
        self.lru = LruCache(max_bytes)
        self.hits = self.misses = 0

    def span(self, state: UserState) -> int:
        return window_len(state, self.max_len, self.context)

    @torch.no_grad()
    def states(self, states: list[UserState], batch: BatchFn) -> tuple[torch.Tensor, torch.Tensor]:
        """h and the pooled state (B, D) float32 of states with events, rounded once from float64: the cached
        windows extended by their new events in one batched forward, the others (misses) computed afresh in
        another."""
        D = self.model64.cfg.d_model
        h, pooled = torch.empty(len(states), D, dtype=torch.float64), torch.empty(len(states), D, dtype=torch.float64)
        lens = [self.span(st) for st in states]
        cached = [self._cached(st, n) for st, n in zip(states, lens)]
        grow = [r for r, w in enumerate(cached) if w is not None and len(w.tokens) < lens[r]]
        missed = [r for r, w in enumerate(cached) if w is None]
        for r, w in enumerate(cached):
            if w is not None and r not in grow:  # nothing new since
                h[r], pooled[r] = w.last, w.total / lens[r]
        for rows, fresh in ((grow, False), (missed, True)):
            if not rows:
                continue
            part = [states[r] for r in rows]
            new = [lens[r] - (0 if fresh else len(cached[r].tokens)) for r in rows]
            s, caches = extend(self.model64, batch(part, [(len(st.tokens) - k, len(st.tokens)) for st, k in
                                                         zip(part, new)]),
                               None if fresh else [cached[r].cache for r in rows])
            for i, (r, st, k) in enumerate(zip(rows, part, new)):
                w = self._keep(st, lens[r], caches[i], s[i, :k], None if fresh else cached[r].total)
                h[r], pooled[r] = w.last, w.total / lens[r]
        self.hits += len(states) - len(missed)
        self.misses += len(missed)
        return h.to(torch.float32), pooled.to(torch.float32)

    def _cached(self, st: UserState, n: int) -> Window | None:
        """The user's cached window if it is the first events of the state's window of `n`, else None."""
        win = self.lru.get(st.user_id, (st.n_events - n, st.user_idx))
        if win is None or not win.holds(st.tokens[len(st.tokens) - n:], _codes(st)[len(st.tokens) - n:],
                                        st.gap[len(st.tokens) - n:]):
            return None
        return win

    def _keep(self, st: UserState, n: int, cache: WindowCache, new: torch.Tensor, total: torch.Tensor | None
              ) -> Window:
        """The window of the state's last `n` events after `new` (k, D), its last k states; cached."""
        sums = torch.cat([new[:0] if total is None else total.unsqueeze(0), new]).cumsum(0)  # as running_mean
        a = len(st.tokens) - n
        win = Window(st.n_events - n, st.user_idx, st.tokens[a:].copy(), _codes(st)[a:].copy(), st.gap[a:].copy(),
                     cache, new[-1].clone(), sums[-1].clone())
        self.lru.put(st.user_id, (win.start, win.user_idx), win)
        return win


def _codes(st: UserState) -> np.ndarray:
    return st.codes.reshape(len(st.tokens), -1)


__all__ = ["Window", "Windows", "window_len"]
