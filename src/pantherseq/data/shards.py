"""Training batches streamed from sharded sequences, one memory-mapped shard at a time (data larger than RAM).

A run prepared with `sequences.shards = N > 1` (data/sequences.py: user u in shard u % N) is trained
without merging the shards: `RunData.train_batches` hands over to `ShardStream.batches`, which per epoch

- takes the shards of its rank: rank r of `world` reads shards r, r + world, ... (disjoint users, so
  disjoint windows), and every rank stops after the same number of steps (the smallest rank's count: the
  extra batches of a larger rank are dropped that epoch, as the one-shard path drops the remainder);
- visits them in an order shuffled by the seed, and within a shard the windows in an order shuffled by
  (seed, shard); a batch never spans two shards (a shard's last batch may be smaller).

With one rank every training window (`Sequences.windows`, the same cut as the one-shard path) is a batch
row exactly once per epoch. Memory: one shard's pages and its (U_s + 1) offsets, the windows of every shard
((W, 2) int64, about 16 / max_len bytes per event), never an array over all events.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

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
                history: int = 0) -> Iterator[Batch]:
        """Shuffled batches of windows of `max_len` events (inputs max_len - 1, as RunData._batch cuts)."""
        wins = self.windows(max_len)
        left = self.steps(max_len, batch_size, world)
        mine = self.shards_of(rank, world)
        for shard in np.random.default_rng(seed).permutation(mine).tolist():
            if left <= 0:
                return
            part = load_shard(self.folder, shard)
            gap = _gap_buckets(part)
            win = wins[shard][np.random.default_rng([seed, shard]).permutation(len(wins[shard]))]
            for b in range(0, len(win), batch_size):
                if left <= 0:
                    return
                w = win[b:b + batch_size]
                yield window_batch(part, gap, self.profile, w[:, 0], w[:, 1] - w[:, 0] - 1, history=history)
                left -= 1

def window_batch(part: Sequences, gap: np.ndarray, profile, starts: np.ndarray, lengths: np.ndarray,
                 target_from: np.ndarray | None = None, history: int = 0, seen: np.ndarray | None = None,
                 local: np.ndarray | None = None) -> Batch:
    """Windows [start, start + length) of `part` (rows local to it: a shard, or a whole run) as a Batch:
    `collate` with each window's user as a global index (`part.users`; the local one where it is None), its
    profile row and first event. `local` = each start's user within `part`, where the caller knows it
    (else found from the offsets); `seen` = `seen_before` flags of `part` (the copy head's targets)."""
    offsets = np.asarray(part.offsets)
    if local is None:
        local = np.searchsorted(offsets, starts, side="right") - 1
    users = local if part.users is None else np.asarray(part.users)[local]
    p = profile
    return collate(part.tokens, part.codes, gap, starts, lengths, users, p.cat[users], p.num[users],
                   p.positives(users), target_from, user_start=offsets[local], history=history, seen_before=seen)


def _gap_buckets(part: Sequences) -> np.ndarray:
    from pantherseq.data.dataset import gap_buckets  # dataset.py imports this module

    return gap_buckets(np.asarray(part.gap))


__all__ = ["ShardStream", "window_batch"]
