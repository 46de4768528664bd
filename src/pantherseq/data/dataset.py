"""Batches for training and evaluation, cut from a prepared run's memory-mapped sequences.

`RunData.load(run_dir)` opens the sequences, encodes the profile and derives the model's `DataInfo`.

- Training (`train_batches`): windows of up to max_len + 1 training-period events (`Sequences.windows`);
  inputs are the first max_len events, targets the same events shifted by one. A run with
  `sequences.shards` > 1 streams its shards one at a time instead of merging them (data/shards.py).
- Evaluation (`eval_batches`, SPEC §6): every event of the evaluated split is a target, predicted from
  its user's earlier events (all splits), with at least max_len // 2 of them as context when the user
  has that many: a user's targets are cut into chunks of `chunk` consecutive events and each chunk is
  predicted in one causal pass over the window that ends just before its last target. A user's very
  first event has no history and is not a target. A sharded run is evaluated shard by shard: its windows
  are rows into the shards laid end to end in shard order (`shard_starts`), each batch cut from one
  memory-mapped shard; the targets and metrics are the merged run's (only their order differs).

Targets that are UNK (an event outside the vocabulary) are never targets, in training or evaluation:
predicting "something rare" is not a behaviour. Their events stay in the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pantherseq.data.batch import Batch, DataInfo, seen_before
from pantherseq.data.schema import GAP_BUCKETS, UNK, DatasetConfig
from pantherseq.data.sequences import Sequences, load_shard, sequence_users, shard_count
from pantherseq.data.shards import ShardStream, add_views, user_groups, window_batch
from pantherseq.data.split import SPLIT_NAMES
from pantherseq.errors import ConfigError, DataError
from pantherseq.run import RunDir


def gap_buckets(gap_s: np.ndarray) -> np.ndarray:
    """Seconds since the previous event -> 1..GAP_BUCKETS-1 on a log2 scale; NaN (first event) -> 0."""
    with np.errstate(invalid="ignore"):
        b = 1 + np.floor(np.log2(1.0 + np.maximum(np.nan_to_num(gap_s, nan=0.0), 0.0)) / 1.5)
    b = np.clip(b, 1, GAP_BUCKETS - 1).astype(np.int64)
    b[np.isnan(gap_s)] = 0
    return b


def gap_bucket_one(gap_s: float | None) -> int:
    """`gap_buckets` for one gap (None = first event), without array overhead (the service's path)."""
    if gap_s is None or math.isnan(gap_s):
        return 0
    b = 1 + math.floor(math.log2(1.0 + max(gap_s, 0.0)) / 1.5)
    return int(min(max(b, 1), GAP_BUCKETS - 1))


@dataclass
class Profile:
    """Per-user profile tensors in user-index order, and the raw values the pair rule compares."""

    cat: torch.Tensor  # (U, Pc) int64 codes, 0 = unknown
    num: torch.Tensor  # (U, Pn) float32 standardised, 0 = unknown
    rule_values: list[np.ndarray]  # one (U,) array per contrastive field (codes or raw numbers)
    rule_tolerance: list[float | None]  # None = must be equal (categorical)
    cat_sizes: list[int]

    @classmethod
    def empty(cls, n_users: int) -> Profile:
        return cls(torch.zeros(n_users, 0, dtype=torch.long), torch.zeros(n_users, 0), [], [], [])

    @classmethod
    def of_run(cls, run: RunDir, n_users: int) -> Profile:
        """The run's encoded profile in user-index order (empty without profile fields), as training encodes it;
        serving and `predict` load it so."""
        cfg, frame = run.config(), run.read_profile()
        return cls.from_frame(frame, cfg) if frame is not None and cfg.profile.fields else cls.empty(n_users)

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, cfg: DatasetConfig) -> Profile:
        cats, nums, sizes, raw = [], [], [], {}
        for f in cfg.profile.fields:
            col = frame[f.name]
            if f.kind == "numeric":
                x = col.cast(pl.Float64).to_numpy().astype(np.float64)
                raw[f.name] = x
                ok = np.isfinite(x)
                mu, sd = (x[ok].mean(), x[ok].std() or 1.0) if ok.any() else (0.0, 1.0)
                nums.append(np.where(ok, (x - mu) / sd, 0.0))
            else:
                values = col.cast(pl.Utf8).drop_nulls().value_counts(sort=True)[f.name].to_list()
                index = {v: i + 1 for i, v in enumerate(values)}
                codes = np.array([index.get(v, 0) for v in col.cast(pl.Utf8).to_list()], dtype=np.int64)
                raw[f.name] = codes
                cats.append(codes)
                sizes.append(len(values) + 1)
        n = frame.height
        cat = torch.from_numpy(np.stack(cats, 1)) if cats else torch.zeros(n, 0, dtype=torch.long)
        num = torch.from_numpy(np.stack(nums, 1).astype(np.float32)) if nums else torch.zeros(n, 0)
        kinds = {f.name: f.kind for f in cfg.profile.fields}
        rule = list(cfg.contrastive.items())
        return cls(cat, num, [raw[k] for k, _ in rule],
                   [float(t) if kinds[k] == "numeric" else None for k, t in rule], sizes)

    def positives(self, users: np.ndarray) -> torch.Tensor:
        """(B, B) bool: pairs of distinct users satisfying every contrastive rule; missing never matches."""
        b = len(users)
        if not self.rule_values:
            return torch.zeros(b, b, dtype=torch.bool)
        ok = ~np.eye(b, dtype=bool)
        for values, tol in zip(self.rule_values, self.rule_tolerance):
            v = values[users]
            if tol is None:
                ok &= (v[:, None] == v[None, :]) & (v[:, None] > 0)
            else:
                with np.errstate(invalid="ignore"):
                    ok &= np.abs(v[:, None] - v[None, :]) <= tol
        return torch.from_numpy(ok)


FRACTION_SEED = 20_240_601  # the windows of `train_fraction`: fixed, so every model of a study gets the same


class RunData:
    """A prepared run opened for training / evaluation."""

    def __init__(self, run_dir: RunDir | str | Path, train_fraction: float = 1.0):
        """`train_fraction` < 1: training uses that seeded share of the training windows (one-shard runs)."""
        self.run = RunDir.of(run_dir)
        self.cfg = self.run.config()
        self.shards = shard_count(self.run.sequences)
        if train_fraction < 1.0 and self.shards > 1:
            raise ConfigError(f"train.data_fraction = {train_fraction} needs a one-shard run; {self.run} has "
                              f"{self.shards} shards")
        self.train_fraction = train_fraction
        self._seq: Sequences | None = None
        self._gap_bucket: np.ndarray | None = None
        self._user_of: np.ndarray | None = None
        if self.shards == 1:  # sharded: merged on first use of `seq` (training streams the shards instead)
            self._seq = Sequences.load(self.run.sequences)
            self._gap_bucket = gap_buckets(np.asarray(self._seq.gap))
            self._user_of = np.repeat(np.arange(self._seq.n_users), np.diff(self._seq.offsets))
        self.tokenizer = self.run.tokenizer()
        profile = self.run.read_profile() if self.cfg.profile.fields else None
        n_users = self._seq.n_users if self._seq is not None else sequence_users(self.run.sequences)
        self.profile = Profile.empty(n_users) if profile is None else Profile.from_frame(profile, self.cfg)
        self.stream = ShardStream(self.run.sequences, self.profile) if self.shards > 1 else None
        self._seen_before: np.ndarray | None = None
        self._shard_starts: np.ndarray | None = None
        self._open: tuple[int, Sequences, np.ndarray, np.ndarray | None] | None = None  # the shard in use

    @classmethod
    def of_sequences(cls, run: RunDir | str | Path, seq: Sequences, profile: Profile, tokenizer=None) -> RunData:
        """A RunData over `seq` alone (e.g. some users of a shard, their global indices in `seq.users`):
        `seq` and `_batch` for code that reads a run's users (fraud/behaviour.py) in a Spark task; `profile`
        is the whole run's (global user order)."""
        self = cls.__new__(cls)
        self.run = RunDir.of(run)
        self.cfg = self.run.config()
        self.shards, self.train_fraction, self.stream = 1, 1.0, None
        self._seq, self._gap_bucket, self._user_of, self._seen_before = seq, None, None, None
        self._shard_starts, self._open = None, None
        self.tokenizer = tokenizer if tokenizer is not None else self.run.tokenizer()
        self.profile = profile
        return self

    @property
    def n_users(self) -> int:
        return self._seq.n_users if self._seq is not None else sequence_users(self.run.sequences)

    @property
    def shard_starts(self) -> np.ndarray:
        """(S + 1,) where each shard starts in the shards laid end to end (the rows of a sharded run's
        evaluation windows); [0, N] for a one-shard run."""
        if self._shard_starts is None:
            sizes = [load_shard(self.run.sequences, i).n_events for i in range(self.shards)]
            self._shard_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return self._shard_starts

    def shard(self, i: int, seen: bool = False) -> tuple[Sequences, np.ndarray, np.ndarray | None]:
        """Shard `i` memory-mapped (with its global user indices in `users`), its gap buckets and, with
        `seen`, its `seen_before` flags; the last one opened is kept. A one-shard run's is `seq`."""
        if self.shards == 1:
            return self.seq, self.gap_bucket, self.seen_before if seen else None
        if self._open is None or self._open[0] != i:
            part = load_shard(self.run.sequences, i)
            self._open = (i, part, gap_buckets(np.asarray(part.gap)), None)
        i, part, gap, flags = self._open
        if seen and flags is None:
            flags = seen_before(np.asarray(part.tokens), np.asarray(part.offsets))
            self._open = (i, part, gap, flags)
        return part, gap, flags if seen else None

    @property
    def seq(self) -> Sequences:
        """Every user's sequences in global order (a sharded run's shards merged in memory on first use)."""
        if self._seq is None:
            self._seq = Sequences.load(self.run.sequences)
        return self._seq

    @property
    def gap_bucket(self) -> np.ndarray:
        if self._gap_bucket is None:
            self._gap_bucket = gap_buckets(np.asarray(self.seq.gap))
        return self._gap_bucket

    @property
    def user_of(self) -> np.ndarray:
        if self._user_of is None:
            self._user_of = np.repeat(np.arange(self.seq.n_users), np.diff(self.seq.offsets))
        return self._user_of

    @property
    def info(self) -> DataInfo:
        return DataInfo(vocab_size=self.tokenizer.vocab_size, field_sizes=self.tokenizer.field_sizes,
                        profile_cat_sizes=list(self.profile.cat_sizes),
                        profile_num=int(self.profile.num.shape[1]), field_names=self.tokenizer.field_names)

    # -- batches ---------------------------------------------------------------------------------
    def _batch(self, starts: np.ndarray, lengths: np.ndarray, target_from: np.ndarray | None = None,
               history: int = 0) -> Batch:
        """Windows [start, start + length) of inputs; targets = the next events (see `collate`); with
        `history` > 0 the user's `history` events before each window (the copy head, `personal`)."""
        return window_batch(self.seq, self.gap_bucket, self.profile, starts, lengths, target_from, history,
                            seen=self.seen_before if target_from is not None else None, local=self.user_of[starts])

    @property
    def seen_before(self) -> np.ndarray:
        """(N,) bool per event: its token occurred earlier in the user's sequence (made on first use)."""
        if self._seen_before is None:
            self._seen_before = seen_before(np.asarray(self.seq.tokens), np.asarray(self.seq.offsets))
        return self._seen_before

    def train_windows(self, max_len: int) -> np.ndarray:
        """(W, 2) training windows of up to `max_len` events: every one, or the seeded `train_fraction` of
        them (at least one; the same ones every epoch, in their order)."""
        win = self.seq.windows(max_len, split="train")
        if self.train_fraction >= 1.0 or not len(win):
            return win
        n = max(1, round(self.train_fraction * len(win)))
        return win[np.sort(np.random.default_rng(FRACTION_SEED).choice(len(win), n, replace=False))]

    def train_batches(self, max_len: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                      history: int = 0, stream: bool | None = None, view_min: int = 0) -> Iterator[Batch]:
        """Shuffled training windows (max_len + 1 events each); rank r of `world` takes every world-th.
        A sharded run (`stream` None or True) streams its shards instead (data/shards.py): rank r reads
        shards r, r + world, ...; `stream=False` merges them and takes this path. `view_min` > 0: each
        batch also carries one view per window (data/shards.py `add_views`, PANTHER's self-contrastive term).

        Raises DataError (on the first batch) when the training period has no target at all."""
        if self.stream is not None and stream is not False:
            yield from self.stream.batches(max_len + 1, batch_size, seed, rank, world, history, view_min)
            return
        require_train_targets(self.seq, max_len, self.run)
        win = self.train_windows(max_len + 1)
        order = np.random.default_rng(seed).permutation(len(win))
        n_batches = math.ceil(len(order) / batch_size)
        if world > 1:  # every rank must take the same number of steps: drop the remainder
            n_batches = n_batches // world * world
        groups = user_groups(win, np.asarray(self.seq.offsets)) if view_min else None
        rng = np.random.default_rng([seed, rank, 1])  # the views' own stream: the windows' order is unchanged
        for b in range(rank, n_batches, world):
            pick = order[b * batch_size:(b + 1) * batch_size]
            w = win[pick]
            if not len(w):
                continue
            if view_min:
                yield window_batch(self.seq, self.gap_bucket, self.profile, w[:, 0], w[:, 1] - w[:, 0] - 1,
                                   history=history, views=add_views(win, groups, pick, rng, view_min))
            else:
                yield self._batch(w[:, 0], w[:, 1] - w[:, 0] - 1, history=history)

    def n_train_targets(self, max_len: int) -> int:
        if self.stream is not None:
            return int(sum((w[:, 1] - w[:, 0] - 1).sum() for w in self.stream.windows(max_len + 1)))
        win = self.train_windows(max_len + 1)
        return int((win[:, 1] - win[:, 0] - 1).sum())

    def train_steps(self, max_len: int, batch_size: int, world: int = 1) -> int:
        """Batches `train_batches` gives each rank per epoch (without merging a sharded run)."""
        if self.stream is not None:
            return self.stream.steps(max_len + 1, batch_size, world)
        n = math.ceil(len(self.train_windows(max_len + 1)) / batch_size)
        return n // world if world > 1 else n

    def eval_windows(self, split: str, max_len: int, chunk: int | None = None,
                     max_users: int | None = None, seed: int = 0) -> np.ndarray:
        """(N, 3) [window start, window length, first target] for every target chunk of `split` (rows into
        the shards laid end to end for a sharded run, module doc)."""
        chunk = chunk or max(max_len // 2, 1)
        code = SPLIT_NAMES.index(split)
        n_users = self.n_users
        users = None
        if max_users is not None and max_users < n_users:
            users = np.sort(np.random.default_rng(seed).choice(n_users, max_users, replace=False))
        if self.shards == 1:
            seq = self.seq
            return _chunk_windows(seq, np.arange(n_users) if users is None else users, code, chunk, max_len, 0)
        out = []
        for i in range(self.shards):
            part = load_shard(self.run.sequences, i)
            glob = np.asarray(part.users)
            local = np.arange(len(glob)) if users is None else np.flatnonzero(np.isin(glob, users))
            out.append(_chunk_windows(part, local, code, chunk, max_len, int(self.shard_starts[i])))
        return np.concatenate(out)

    def eval_batches(self, windows: np.ndarray, batch_size: int, history: int = 0) -> Iterator[Batch]:
        """Batches of `batch_size` windows; a sharded run's batch is split where it crosses shards."""
        if self.shards == 1:
            for i in range(0, len(windows), batch_size):
                w = windows[i:i + batch_size]
                yield self._batch(w[:, 0], w[:, 1], target_from=w[:, 2], history=history)
            return
        bounds = self.shard_starts
        for i in range(0, len(windows), batch_size):
            w = windows[i:i + batch_size]
            owner = np.searchsorted(bounds, w[:, 0], side="right") - 1
            for shard in dict.fromkeys(owner.tolist()):  # in order of appearance
                v = w[owner == shard]
                base = bounds[shard]
                part, gap, flags = self.shard(shard, seen=True)
                yield window_batch(part, gap, self.profile, v[:, 0] - base, v[:, 1], v[:, 2] - base, history,
                                   seen=flags)


def _chunk_windows(seq: Sequences, users: np.ndarray, code: int, chunk: int, max_len: int,
                   base: int) -> np.ndarray:
    """`RunData.eval_windows` of the (local) users `users` of `seq`, rows shifted by `base`."""
    split_arr = np.asarray(seq.split)
    rows = []
    for u in users.tolist():
        s, e = int(seq.offsets[u]), int(seq.offsets[u + 1])
        hits = np.flatnonzero(split_arr[s:e] == code) + s
        hits = hits[hits > s]  # the first event has no history
        for c in range(0, len(hits), chunk):
            c0, c1 = int(hits[c]), int(hits[min(c + chunk, len(hits)) - 1]) + 1
            w0 = max(s, c1 - 1 - max_len)
            rows.append((w0 + base, c1 - 1 - w0, c0 + base))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def train_targets(seq: Sequences, max_len: int) -> int:
    """How many training targets (next events that are not UNK) the training windows hold."""
    win = seq.windows(max_len + 1, split="train")
    if not len(win):
        return 0
    known = np.concatenate([[0], np.cumsum(np.asarray(seq.tokens) != UNK)])
    return int((known[win[:, 1]] - known[win[:, 0] + 1]).sum())


def require_train_targets(seq: Sequences | None, max_len: int, run: RunDir | str | Path) -> None:
    """One DataError line when there is nothing to train on (no user with two known training events).
    `seq` None: the run's sequences, shard by shard (a sharded run is not merged)."""
    if seq is None:
        folder = RunDir.of(run).sequences
        known = any(train_targets(load_shard(folder, i), max_len) for i in range(shard_count(folder)))
    else:
        known = train_targets(seq, max_len) > 0
    if not known:
        raise DataError(f"{run}: the training period has no targets (no user has a training event followed "
                        "by another one in the vocabulary): move split.t1 later or prepare more data")
