"""Per-user token sequences on disk, memory-mapped by the trainer (no Python object per event).

A run directory's `sequences/` folder holds flat NumPy arrays in user-major, chronological order,
with `offsets` marking where each user starts (CSR layout; user u owns rows offsets[u]:offsets[u+1]):

    offsets.npy   (U+1,)  int64    row where each user starts; offsets[-1] = N
    tokens.npy    (N,)    int32    token ids (PAD = 0 never stored; UNK = 1 for uncovered events)
    codes.npy     (N, F)  int32    per-field codes (0 = the field's UNK), F = the tokenizer's fields
    time.npy      (N,)    int64    event time, seconds since the Unix epoch
    gap.npy       (N,)    float32  seconds since the user's previous event (NaN for the first)
    label.npy     (N,)    int8     1 / 0, -1 when unknown
    scenario.npy  (N,)    int16    fraud scenario id, 0 = genuine
    split.npy     (N,)    int8     0 train, 1 valid, 2 test
    meta.json             field names, counts, format version

`users.parquet` beside it maps the user index u to the original `user_id`.

Shards (`sequences.shards = N` in the dataset config, both engines): user u goes to shard u % N (users are
dealt round-robin in user-index order: the same in every engine, balanced within one user). With N = 1 the
folder is laid out as above. With N > 1 it holds `meta.json` ({"shards": N, ...}) and `shard-00000/` ..
`shard-{N-1}/`, each a folder of the layout above for its own users (local index, user-major) plus

    users.npy     (U_s,)  int64    the global user index of each local user, ascending

`Sequences.load` on a sharded folder returns all users in global order (in memory); `load_shards` returns
the shards themselves, memory-mapped, for a reader that takes them one at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pantherseq.data.split import SPLIT_NAMES
from pantherseq.errors import DataError

FORMAT_VERSION = 1
ARRAYS = ("tokens", "codes", "time", "gap", "label", "scenario", "split")
SHARD_USERS = "users.npy"


def shard_of(user_idx: np.ndarray, shards: int) -> np.ndarray:
    """The shard of each global user index: users are dealt round-robin."""
    return np.asarray(user_idx, dtype=np.int64) % shards


def shard_folder(folder: str | Path, shard: int, shards: int) -> Path:
    """Where shard `shard` of `shards` lives (the folder itself when there is one shard)."""
    return Path(folder) if shards == 1 else Path(folder) / f"shard-{shard:05d}"


@dataclass
class Sequences:
    offsets: np.ndarray
    tokens: np.ndarray
    codes: np.ndarray
    time: np.ndarray
    gap: np.ndarray
    label: np.ndarray
    scenario: np.ndarray
    split: np.ndarray
    field_names: list[str]
    users: np.ndarray | None = None  # global user index of each local user (a shard); None = 0..U-1

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_events(self) -> int:
        return int(self.offsets[-1])

    def user_slice(self, u: int) -> slice:
        return slice(int(self.offsets[u]), int(self.offsets[u + 1]))

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "offsets.npy", self.offsets)
        for name in ARRAYS:
            np.save(folder / f"{name}.npy", getattr(self, name))
        if self.users is not None:
            np.save(folder / SHARD_USERS, np.asarray(self.users, dtype=np.int64))
        meta = {"format_version": FORMAT_VERSION, "users": self.n_users, "events": self.n_events,
                "fields": self.field_names, "arrays": list(ARRAYS)}
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))

    def take_users(self, local: np.ndarray) -> Sequences:
        """The sub-sequences of the local users `local` (ascending), their global indices kept in `users`."""
        local = np.asarray(local, dtype=np.int64)
        lengths = (self.offsets[local + 1] - self.offsets[local]).astype(np.int64)
        rows = _ranges(self.offsets[local].astype(np.int64), lengths)
        arrays = {name: np.asarray(getattr(self, name))[rows] for name in ARRAYS}
        glob = local if self.users is None else np.asarray(self.users)[local]
        return Sequences(offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), **arrays,
                         field_names=self.field_names, users=glob.astype(np.int64))

    def save_shards(self, folder: str | Path, shards: int) -> None:
        """Write these (all) users into `shards` shards: user u to shard u % shards (one folder when 1)."""
        if shards == 1:
            self.save(folder)
            return
        owner = shard_of(np.arange(self.n_users), shards)
        for shard in range(shards):
            self.take_users(np.flatnonzero(owner == shard)).save(shard_folder(folder, shard, shards))
        write_shards_meta(folder, shards, self.n_users, self.n_events, self.field_names)

    @classmethod
    def load(cls, folder: str | Path, mmap: bool = True) -> Sequences:
        """All users in global order: memory-mapped from one folder, or merged in memory from shards."""
        meta = _meta(folder)
        if meta.get("shards", 1) > 1:
            return merge_shards(load_shards(folder))
        return cls._load_one(Path(folder), meta, mmap)

    @classmethod
    def _load_one(cls, folder: Path, meta: dict, mmap: bool) -> Sequences:
        mode = "r" if mmap else None
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode=mode) for name in ("offsets", *ARRAYS)}
        users = np.load(folder / SHARD_USERS) if (folder / SHARD_USERS).is_file() else None
        return cls(**arrays, field_names=meta["fields"], users=users)

    def windows(self, max_len: int, stride: int | None = None, split: str | None = "train") -> np.ndarray:
        """Training windows over long histories: (W, 2) int64 [start, end) rows into the flat arrays.

        Within each user, only events of `split` are used (None = all); they form a prefix for both
        split kinds. A history of n <= max_len events is one window; a longer one is cut into windows
        of max_len events starting every `stride` (default max_len - 1, so consecutive windows share
        one event and every next-event transition is a target exactly once), the last aligned to the
        end of the history so the most recent events get a full context.
        """
        stride = stride or max(max_len - 1, 1)
        starts = self.offsets[:-1].astype(np.int64)
        if split is None:
            lengths = np.diff(self.offsets).astype(np.int64)
        else:
            code = SPLIT_NAMES.index(split)
            in_split = np.asarray(self.split == code, dtype=np.int64)
            cum = np.concatenate([[0], np.cumsum(in_split)])
            lengths = cum[self.offsets[1:]] - cum[self.offsets[:-1]]
            # the split's events must be contiguous within a user: find each user's first one
            first = np.where(lengths > 0, _first_index(self.split, code, self.offsets), starts)
            starts = first
        return _cut(starts, lengths, max_len, stride)


def _meta(folder: str | Path) -> dict:
    meta_path = Path(folder) / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{folder} holds no sequences (no meta.json): run `pantherseq prepare` first")
    return json.loads(meta_path.read_text())


def write_shards_meta(folder: str | Path, shards: int, users: int, events: int, fields: list[str]) -> None:
    """The top-level meta.json of a sharded folder (written once every shard is)."""
    meta = {"format_version": FORMAT_VERSION, "shards": shards, "users": users, "events": events,
            "fields": fields, "arrays": list(ARRAYS), "shard_of_user": "user_idx % shards"}
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "meta.json").write_text(json.dumps(meta, indent=1))


def load_shards(folder: str | Path, mmap: bool = True) -> list[Sequences]:
    """Every shard of a sequences folder, memory-mapped (a one-shard folder is a list of one)."""
    meta = _meta(folder)
    shards = int(meta.get("shards", 1))
    if shards == 1:
        return [Sequences._load_one(Path(folder), meta, mmap)]
    return [Sequences._load_one(shard_folder(folder, i, shards), _meta(shard_folder(folder, i, shards)), mmap)
            for i in range(shards)]


def shard_count(folder: str | Path) -> int:
    """How many shards a sequences folder holds (1 for the one-folder layout)."""
    return int(_meta(folder).get("shards", 1))


def sequence_users(folder: str | Path) -> int:
    """How many users a sequences folder holds (all shards), from its meta.json."""
    return int(_meta(folder)["users"])


def load_shard(folder: str | Path, shard: int, mmap: bool = True) -> Sequences:
    """Shard `shard` of a sequences folder, memory-mapped, with its global user indices in `users` (for a
    one-shard folder, 0..U-1)."""
    shards = shard_count(folder)
    if not 0 <= shard < shards:
        raise DataError(f"{folder} has {shards} shards, not shard {shard}")
    path = shard_folder(folder, shard, shards)
    seq = Sequences._load_one(path, _meta(path), mmap)
    if seq.users is None:
        seq.users = np.arange(seq.n_users, dtype=np.int64)
    return seq


def merge_shards(parts: list[Sequences]) -> Sequences:
    """Shards -> one Sequences of every user in global user-index order (in memory)."""
    users = np.concatenate([p.users if p.users is not None else np.arange(p.n_users) for p in parts])
    starts = np.concatenate([np.asarray(p.offsets[:-1]) + sum(q.n_events for q in parts[:i])
                             for i, p in enumerate(parts)]).astype(np.int64)
    lengths = np.concatenate([np.diff(p.offsets) for p in parts]).astype(np.int64)
    order = np.argsort(users, kind="stable")
    rows = _ranges(starts[order], lengths[order])
    arrays = {name: np.concatenate([np.asarray(getattr(p, name)) for p in parts])[rows] for name in ARRAYS}
    return Sequences(offsets=np.concatenate([[0], np.cumsum(lengths[order])]).astype(np.int64), **arrays,
                     field_names=parts[0].field_names)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated row ranges [start, start + length) as one int64 index array."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    shift = np.repeat(starts - (ends - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


def _first_index(split: np.ndarray, code: int, offsets: np.ndarray) -> np.ndarray:
    """Index of each user's first event with split == code (offsets[u] if none)."""
    hit = np.flatnonzero(np.asarray(split) == code)
    pos = np.searchsorted(hit, offsets[:-1])
    pos = np.minimum(pos, max(len(hit) - 1, 0))
    return hit[pos] if len(hit) else offsets[:-1].copy()


def _cut(starts: np.ndarray, lengths: np.ndarray, max_len: int, stride: int) -> np.ndarray:
    out = []
    for s, n in zip(starts.tolist(), lengths.tolist()):
        if n < 2:
            continue  # a single event has no next event to predict
        if n <= max_len:
            out.append((s, s + n))
            continue
        offs = list(range(0, n - max_len, stride)) + [n - max_len]
        out.extend((s + o, s + o + max_len) for o in offs)
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)
