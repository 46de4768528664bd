"""Training batches streamed from sharded sequences, one memory-mapped shard at a time (data larger than RAM).

A run prepared with `sequences.shards = N > 1` (data/sequences.py: user u in shard u % N) is trained
without merging the shards: `RunData.train_batches` hands over to `ShardStream.batches`, which per epoch

- takes the shards of its rank: rank r of `world` reads shards r, r + world, ... (disjoint users, so
  disjoint windows), and every rank stops after the same number of steps (the smallest rank's count: the
  extra batches of a larger rank are dropped that epoch, as the one-shard path drops the remainder);
- visits them in an order shuffled by the seed, and within a shard the windows in an order shuffled by
  (seed, shard); a batch never spans two shards (a shard's last batch may be smaller).

With one rank every training window (`Sequences.windows`, the same cut as the one-shard path) is a batch
row exactly once per epoch. With `view_min` > 0 (PANTHER's `contrastive_on = "self"`) each batch also
carries one view per window (`add_views`), after the windows, with no targets. Memory: one shard's pages
and its (U_s + 1) offsets, the windows of every shard ((W, 2) int64, about 16 / max_len bytes per event),
never an array over all events.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pantherseq.data.batch import Batch, collate
from pantherseq.data.schema import UNK
from pantherseq.data.sequences import Sequences, load_shard, shard_count
from pantherseq.errors import DataError


def _targets(seq: Sequences, win: np.ndarray) -> int:
    """Known (not UNK) next-event targets in the windows `win` of `seq`."""
    if not len(win):
        return 0
    known = np.concatenate([[0], np.cumsum(np.asarray(seq.tokens) != UNK)])
    return int((known[win[:, 1]] - known[win[:, 0] + 1]).sum())


class ShardStream:
    """The training windows of a sharded sequences folder and the batches cut from them (module doc)."""

    def __init__(self, folder: str | Path, profile):
        self.folder = Path(folder)
        self.shards = shard_count(self.folder)
        self.profile = profile  # data/dataset.py Profile, in global user-index order
        self._windows: dict[int, list[np.ndarray]] = {}

    def windows(self, max_len: int) -> list[np.ndarray]:
        """Per shard, its training windows of up to `max_len` events (rows into the shard); DataError when
        no shard holds a training target (the message of dataset.require_train_targets)."""
        if max_len not in self._windows:
            wins, targets = [], 0
            for i in range(self.shards):
                part = load_shard(self.folder, i)
                wins.append(part.windows(max_len, split="train"))
                targets += _targets(part, wins[-1])
            if targets == 0:
                raise DataError(f"{self.folder.parent}: the training period has no targets (no user has a "
                                "training event followed by another one in the vocabulary): move split.t1 later "
                                "or prepare more data")
            self._windows[max_len] = wins
        return self._windows[max_len]

    def shards_of(self, rank: int, world: int) -> list[int]:
        if self.shards < world:
            raise DataError(f"{self.folder}: {self.shards} shards for {world} ranks: every rank reads its own "
                            f"shards; prepare with sequences.shards >= {world}")
        return list(range(rank, self.shards, world))

    def steps(self, max_len: int, batch_size: int, world: int = 1) -> int:
        """Batches each rank takes per epoch: the same on every rank."""
        n = [math.ceil(len(w) / batch_size) for w in self.windows(max_len)]
        return min(sum(n[i] for i in self.shards_of(r, world)) for r in range(world))

    def batches(self, max_len: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                history: int = 0, view_min: int = 0) -> Iterator[Batch]:
        """Shuffled batches of windows of `max_len` events (inputs max_len - 1, as RunData._batch cuts);
        with `view_min` > 0 each with its windows' views (`add_views`)."""
        wins = self.windows(max_len)
        left = self.steps(max_len, batch_size, world)
        mine = self.shards_of(rank, world)
        for shard in np.random.default_rng(seed).permutation(mine).tolist():
            if left <= 0:
                return
            part = load_shard(self.folder, shard)
            gap = _gap_buckets(part)
            order = np.random.default_rng([seed, shard]).permutation(len(wins[shard]))
            groups = user_groups(wins[shard], np.asarray(part.offsets)) if view_min else None
            rng = np.random.default_rng([seed, shard, 1])
            for b in range(0, len(order), batch_size):
                if left <= 0:
                    return
                pick = order[b:b + batch_size]
                w = wins[shard][pick]
                views = add_views(wins[shard], groups, pick, rng, view_min) if view_min else None
                yield window_batch(part, gap, self.profile, w[:, 0], w[:, 1] - w[:, 0] - 1, history=history,
                                   views=views)
                left -= 1


def user_groups(win: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each window of `win` (W, 2), ordered by start, the first and one-past-last index in `win` of its
    user's windows (a user's windows are adjacent: events are user-major)."""
    starts = win[:, 0]
    if len(starts) > 1 and (np.diff(starts) < 0).any():
        raise ValueError("user_groups: windows must be ordered by start")
    user = np.searchsorted(offsets, starts, side="right") - 1
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(user)) + 1, [len(win)]])
    group = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    return bounds[group], bounds[group + 1]


def add_views(win: np.ndarray, groups: tuple[np.ndarray, np.ndarray], pick: np.ndarray, rng: np.random.Generator,
              view_min: int) -> tuple[np.ndarray, np.ndarray]:
    """One view per picked window (rows `pick` of `win`): a contiguous slice, of a length drawn uniformly
    between min(view_min, n) and n, of the inputs (n events) of a training window of the same user drawn
    uniformly among that user's windows (the picked one included). -> (starts, lengths) of the views.
    A user with one window is viewed within it; one with many, mostly from elsewhere in their history (CoLES's
    random slices, within the windows the trainer may see)."""
    first, end = groups[0][pick], groups[1][pick]
    other = first + (rng.random(len(pick)) * (end - first)).astype(np.int64)
    start, n = win[other, 0], win[other, 1] - win[other, 0] - 1  # a window's last event is only a target
    lo = np.minimum(view_min, n)
    length = lo + (rng.random(len(pick)) * (n - lo + 1)).astype(np.int64)
    return start + (rng.random(len(pick)) * (n - length + 1)).astype(np.int64), length


def window_batch(part: Sequences, gap: np.ndarray, profile, starts: np.ndarray, lengths: np.ndarray,
                 target_from: np.ndarray | None = None, history: int = 0, seen: np.ndarray | None = None,
                 local: np.ndarray | None = None, views: tuple[np.ndarray, np.ndarray] | None = None) -> Batch:
    """Windows [start, start + length) of `part` (rows local to it: a shard, or a whole run) as a Batch:
    `collate` with each window's user as a global index (`part.users`; the local one where it is None), its
    profile row and first event. `local` = each start's user within `part`, where the caller knows it
    (else found from the offsets); `seen` = `seen_before` flags of `part` (the copy head's targets).

    `views` (training only): (starts, lengths) of extra rows appended after the windows, inputs only (no
    targets, so the generative loss is the windows' alone); the positives are then every pair of rows of one
    user (the self-contrastive term), not the profile rule."""
    offsets = np.asarray(part.offsets)
    if views is not None:
        n = len(starts)
        starts, lengths = np.concatenate([starts, views[0]]), np.concatenate([lengths, views[1]])
        # a window's targets all count; a view's start after its last input (none)
        target_from = np.concatenate([starts[:n], views[0] + views[1] + 1])
        local = None
    if local is None:
        local = np.searchsorted(offsets, starts, side="right") - 1
    users = local if part.users is None else np.asarray(part.users)[local]
    p = profile
    if views is None:
        positives = p.positives(users)
    else:
        positives = torch.from_numpy((users[:, None] == users[None, :]) & ~np.eye(len(users), dtype=bool))
    return collate(part.tokens, part.codes, gap, starts, lengths, users, p.cat[users], p.num[users],
                   positives, target_from, user_start=offsets[local], history=history, seen_before=seen)


def _gap_buckets(part: Sequences) -> np.ndarray:
    from pantherseq.data.dataset import gap_buckets  # dataset.py imports this module

    return gap_buckets(np.asarray(part.gap))


__all__ = ["ShardStream", "add_views", "user_groups", "window_batch"]
