"""What the data side hands every next-behaviour model: the `Batch`, the `DataInfo` sizes and `collate`.

A `Batch` holds right-padded windows of events (PAD = 0):

    tokens       (B, T)    int64   input token ids
    targets      (B, T)    int64   the next token at each position, PAD (0) where there is none
    codes        (B, T, F) int64   per-field codes of the input events (0 = the field's UNK, and padding)
    gap_bucket   (B, T)    int64   log time-gap bucket of the input events (0 = first event / padding)
    profile_cat  (B, Pc)   int64   categorical profile codes (0 = unknown); Pc may be 0
    profile_num  (B, Pn)   float32 standardised numeric profile values (0 = unknown); Pn may be 0
    positives    (B, B)    bool    contrastive positive pairs (profile rule), False on the diagonal
    users        (B,)      int64   user index
  optional (None unless asked for):
    target_codes (B, T, F) int64   per-field codes of the next event (0 where there is no target; an UNK
                                   token target keeps its field codes: the per-field heads learn from it)
    history      (B, H)    int64   the user's H events before the window, oldest first, PAD-filled on the
                                   left (the copy head and `personal` see them)
    target_repeat (B, T)   bool    the target token occurred earlier in the user's sequence (repeat vs
                                   explore metrics)

`collate` cuts windows out of flat per-event arrays (the CSR layout of `data/sequences.py`) into a Batch;
`RunData` (data/dataset.py) and anything else that holds such arrays build their batches with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from pantherseq.data.schema import PAD, UNK


@dataclass
class Batch:
    tokens: torch.Tensor
    targets: torch.Tensor
    codes: torch.Tensor
    gap_bucket: torch.Tensor
    profile_cat: torch.Tensor
    profile_num: torch.Tensor
    positives: torch.Tensor
    users: torch.Tensor
    target_codes: torch.Tensor | None = None
    history: torch.Tensor | None = None
    target_repeat: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
                        for f in fields(self)})

    @property
    def mask(self) -> torch.Tensor:
        """(B, T) bool: real (non-padding) input positions."""
        return self.tokens != PAD


@dataclass
class DataInfo:
    """Sizes a model needs from the prepared run; derived once, never written twice."""

    vocab_size: int
    field_sizes: list[int] = field(default_factory=list)
    profile_cat_sizes: list[int] = field(default_factory=list)
    profile_num: int = 0
    field_names: list[str] = field(default_factory=list)  # field_sizes' fields (empty in older checkpoints)


def collate(tokens: np.ndarray, codes: np.ndarray, gap_bucket: np.ndarray, starts: np.ndarray,
            lengths: np.ndarray, users: np.ndarray, profile_cat: torch.Tensor, profile_num: torch.Tensor,
            positives: torch.Tensor, target_from: np.ndarray | None = None, user_start: np.ndarray | None = None,
            history: int = 0, seen_before: np.ndarray | None = None) -> Batch:
    """A Batch of the windows [start, start + length) of flat per-event arrays.

    tokens (N,), codes (N, F), gap_bucket (N,): every event of every user, user-major (the windows never
    cross a user's end except for the last target, which the caller avoids by the window length).
    starts, lengths, users (B,): each window's first row, length (>= 1) and user index.
    profile_cat (B, Pc), profile_num (B, Pn), positives (B, B): the windows' users' profile tensors.
    Targets are the next events; UNK targets become PAD (never a target); with `target_from` (B,)
    (evaluation) only targets at rows >= target_from count. Target codes are always filled. With
    `history` > 0 and `user_start` (B,) (each window's user's first row), the `history` events before each
    window; with `seen_before` (N,) bool (the event's token occurred earlier in its user's sequence), the
    targets' repeat flags.
    """
    T = int(lengths.max())
    idx = starts[:, None] + np.arange(T)[None, :]  # (B, T)
    real = np.arange(T)[None, :] < lengths[:, None]
    idx = np.where(real, idx, 0)
    toks = np.where(real, tokens[idx], PAD)
    nxt = np.minimum(idx + 1, len(tokens) - 1)
    has_next = real.copy()
    if target_from is not None:
        has_next &= (idx + 1) >= target_from[:, None]
    targets = np.where(has_next, tokens[nxt], PAD)
    targets[targets == UNK] = PAD
    field_codes = np.where(real[..., None], codes[idx], 0)
    target_codes = np.where(has_next[..., None], codes[nxt], 0)
    gaps = np.where(real, gap_bucket[idx], 0)
    hist = None
    if history > 0 and user_start is not None:
        hidx = starts[:, None] - history + np.arange(history)[None, :]  # (B, H), oldest first
        ok = hidx >= np.asarray(user_start)[:, None]
        hist = torch.from_numpy(np.where(ok, tokens[np.where(ok, hidx, 0)], PAD).astype(np.int64))
    repeat = None
    if seen_before is not None:
        repeat = torch.from_numpy(np.where(targets != PAD, seen_before[nxt], False))
    return Batch(
        tokens=torch.from_numpy(toks.astype(np.int64)), targets=torch.from_numpy(targets.astype(np.int64)),
        codes=torch.from_numpy(field_codes.astype(np.int64)), gap_bucket=torch.from_numpy(gaps.astype(np.int64)),
        profile_cat=profile_cat, profile_num=profile_num, positives=positives,
        users=torch.from_numpy(np.asarray(users).astype(np.int64)),
        target_codes=torch.from_numpy(target_codes.astype(np.int64)), history=hist, target_repeat=repeat,
    )


def seen_before(tokens: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(N,) bool: event i's token occurred at an earlier event of the same user (flat CSR arrays)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens)
    user = np.repeat(np.arange(len(offsets) - 1), np.diff(np.asarray(offsets, dtype=np.int64)))
    order = np.lexsort((np.arange(n), tokens, user))  # by user, token, then position
    key_u, key_t = user[order], tokens[order]
    first = np.ones(n, dtype=bool)
    first[1:] = (key_u[1:] != key_u[:-1]) | (key_t[1:] != key_t[:-1])
    out = np.empty(n, dtype=bool)
    out[order] = ~first
    return out


__all__ = ["Batch", "DataInfo", "collate", "seen_before"]
