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
        meta = {"format_version": FORMAT_VERSION, "users": self.n_users, "events": self.n_events,
                "fields": self.field_names, "arrays": list(ARRAYS)}
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, folder: str | Path, mmap: bool = True) -> Sequences:
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{folder} holds no sequences (no meta.json): run `pantherseq prepare` first")
        meta = json.loads(meta_path.read_text())
        mode = "r" if mmap else None
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode=mode) for name in ("offsets", *ARRAYS)}
        return cls(**arrays, field_names=meta["fields"])

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
