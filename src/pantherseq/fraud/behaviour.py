"""Behaviour features from a trained generative model: Δ (deviation.py) and the user state, for every chosen
transaction, from one causal forward pass per window of a user's history (never one pass per transaction).

Windows. A user's chosen transactions (events with `want` set, the user's first event excluded: it has no
history) are cut into chunks of `chunk` consecutive events, counted from the first chosen one. The chunk
[c0, c1) is predicted from one window of inputs [w0, c1 − 1) with w0 = max(user start, c0 − 1 − context):
the state at input position j − 1 predicts event j, so every prediction sees only strictly earlier events
and at least `context` of them (when the user has that many), and the window has at most
chunk + context = max_len inputs. w0 depends only on c0, so adding or changing later events never
changes an earlier transaction's features (tested).

User state, as of each transaction j (strictly before it):
- `e_u`: the mean of the causal states over the window's inputs up to j − 1, i.e. `model.embed()` of
  the window [w0, j) (tested to be equal): the pooled recent history of up to max_len events;
- `recent`: the causal state h_{j−1} itself, the model's encoding of the last events before j (with the
  default context of 100 it attends to at least the last 100 events when the user has them). It is
  also the vector the next-token prediction is made from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from pantherseq.data.dataset import RunData
from pantherseq.fraud.deviation import DELTA_NAMES, deviation_features, field_members, field_onehot
from pantherseq.model.base import NeuralModel
from pantherseq.tokenizer import N_SPECIAL, StructuredTokenizer

log = logging.getLogger(__name__)
MAX_ORDERED_CODES = 256  # numeric token fields with at most this many buckets get the upper-tail surprisal


def scoring_windows(offsets: np.ndarray, want: np.ndarray, max_len: int, context: int
                    ) -> tuple[np.ndarray, int]:
    """(W, 3) int64 rows [w0, c0, c1] covering every wanted event that has history, and the chunk size.

    Each user's wanted events must be contiguous (a time range is). Chunks of max_len − context targets."""
    context = int(min(max(context, 1), max_len - 1))
    chunk = max_len - context
    want = np.asarray(want, dtype=bool)
    starts = offsets[:-1].astype(np.int64)
    ends = offsets[1:].astype(np.int64)
    cum = np.concatenate([[0], np.cumsum(want)])
    n_want = cum[ends] - cum[starts]
    pos = np.flatnonzero(want)
    has = n_want > 0
    first = np.full(len(starts), -1, dtype=np.int64)
    first[has] = pos[cum[starts[has]]]
    last = np.full(len(starts), -1, dtype=np.int64)
    last[has] = pos[cum[ends[has]] - 1]
    if np.any(has & (last - first + 1 != n_want)):
        raise ValueError("the wanted events of a user must be contiguous")
    first = np.maximum(first, starts + 1)  # the first event of a user has no history
    ok = has & (first <= last)
    users = np.flatnonzero(ok)
    n_chunks = (last[users] - first[users]) // chunk + 1
    u = np.repeat(users, n_chunks)
    k = np.arange(int(n_chunks.sum())) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    c0 = first[u] + k * chunk
    c1 = np.minimum(c0 + chunk, last[u] + 1)
    w0 = np.maximum(starts[u], c0 - 1 - context)
    return np.stack([w0, c0, c1], 1).astype(np.int64).reshape(-1, 3), chunk


@dataclass
class BehaviourFeatures:
    """Features of the events `index` (flat event indices, ascending): Δ by name, e_u and recent (N, D)."""

    index: np.ndarray
    delta: dict[str, np.ndarray]
    e_u: np.ndarray
    recent: np.ndarray


class DeviationVocab:
    """What the Δ need from the tokenizer: per-field token members and the ordered fields' one-hot tables
    (shared by the offline pass and the service: serve/online.py)."""

    def __init__(self, tok: StructuredTokenizer):
        v = tok.vocab_size - N_SPECIAL
        names = tok.field_names
        self.token_fields = list(tok.token_fields)
        self.code_cols = [names.index(n) for n in self.token_fields]
        token_codes = np.array([tok.token_codes(t) for t in range(N_SPECIAL, tok.vocab_size)],
                               dtype=np.int64).reshape(v, len(self.token_fields))
        sizes = [tok.field_sizes[c] for c in self.code_cols]
        self.members = [field_members(token_codes[:, f], sizes[f])
                        for f in range(len(self.token_fields))]
        kinds = {f.name: f.kind for f in tok.fields}
        self.ordered = {f: field_onehot(token_codes[:, f], sizes[f]) for f, n in enumerate(self.token_fields)
                        if kinds.get(n) == "numeric" and sizes[f] <= MAX_ORDERED_CODES}
        self._weight_t: torch.Tensor | None = None
        # the same tables as index arrays, for the one-position NumPy path (deviation_one)
        self.member_index = [_groups(token_codes[:, f], sizes[f]) for f in range(len(self.token_fields))]
        self.ordered_codes = {f: token_codes[:, f] for f in self.ordered}

    def weight_t(self, weight: torch.Tensor) -> torch.Tensor:
        if self._weight_t is None:
            self._weight_t = weight.t().contiguous()
        return self._weight_t


def _groups(codes: np.ndarray, size: int) -> list[np.ndarray]:
    """[indices of the tokens with code c for c in 0..size-1], by one stable sort."""
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(size + 1))
    return [order[bounds[c]:bounds[c + 1]] for c in range(size)]


def delta_from_hidden(model: NeuralModel, h: torch.Tensor, tokens: torch.Tensor, codes: torch.Tensor,
                      vocab: DeviationVocab, pos_chunk: int = 128) -> dict[str, torch.Tensor]:
    """h (N, D) states that predict the observed events, their tokens (N,) and token-field codes (N, Ft)
    -> Δ by name (N,), `pos_chunk` rows at a time."""
    weight = model.output_weight[N_SPECIAL:]
    weight_t = vocab.weight_t(weight)  # (D, V) contiguous, made once
    bias = model.out_bias[N_SPECIAL:]
    obs = torch.where(tokens >= N_SPECIAL, tokens - N_SPECIAL, torch.full_like(tokens, -1))
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, h.shape[0], pos_chunk):  # small chunks: the (n, V) passes stay in cache
        hh = h[i:i + pos_chunk]
        logits = torch.addmm(bias, hh, weight_t)  # (n, V)
        feats = deviation_features(logits, hh, weight, obs[i:i + pos_chunk], codes[i:i + pos_chunk],
                                   vocab.members, vocab.token_fields, vocab.ordered)
        for k, val in feats.items():
            parts.setdefault(k, []).append(val)
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def behaviour_features(model: NeuralModel, data: RunData, want: np.ndarray, context: int = 100,
                       batch_windows: int = 64, pos_chunk: int = 128) -> BehaviourFeatures:
    """Δ, e_u and the recent-pattern state for every wanted event that has history (see the module doc)."""
    model.eval()
    max_len = model.cfg.max_len
    seq = data.seq
    windows, _ = scoring_windows(np.asarray(seq.offsets), want, max_len, context)
    vocab = DeviationVocab(data.tokenizer)
    tokens_all = np.asarray(seq.tokens)
    codes_all = np.asarray(seq.codes)[:, vocab.code_cols]
    n = int((windows[:, 2] - windows[:, 1]).sum())
    index = np.empty(n, dtype=np.int64)
    d = model.cfg.d_model
    e_u = np.empty((n, d), dtype=np.float32)
    recent = np.empty((n, d), dtype=np.float32)
    delta: dict[str, np.ndarray] = {}
    row = 0
    log.info("behaviour features: %d events in %d windows", n, len(windows))
    step = max(len(windows) // 10 // batch_windows * batch_windows, batch_windows)
    for b in range(0, len(windows), batch_windows):
        if b and b % step == 0 and len(windows) > 20 * batch_windows:
            log.info("behaviour features: %d of %d windows", b, len(windows))
        w = windows[b:b + batch_windows]
        batch = data._batch(w[:, 0], w[:, 2] - 1 - w[:, 0])
        h = model.hidden(batch)  # (B, T, D)
        T = h.shape[1]
        cmean = h.cumsum(1) / torch.arange(1, T + 1, dtype=h.dtype).view(1, T, 1)  # (B, T, D)
        m = w[:, 2] - w[:, 1]
        r = np.repeat(np.arange(len(w)), m)
        j = np.concatenate([np.arange(c0, c1) for c0, c1 in zip(w[:, 1], w[:, 2])])  # target events
        p = j - 1 - w[r, 0]  # input position that predicts event j
        rt, pt = torch.from_numpy(r), torch.from_numpy(p)
        hs = h[rt, pt]  # (n, D)
        feats = delta_from_hidden(model, hs, torch.from_numpy(tokens_all[j].astype(np.int64)),
                                torch.from_numpy(codes_all[j].astype(np.int64)), vocab, pos_chunk)
        k = len(j)
        index[row:row + k] = j
        e_u[row:row + k] = cmean[rt, pt].numpy()
        recent[row:row + k] = hs.numpy()
        for name, val in feats.items():
            delta.setdefault(name, np.empty(n, dtype=np.float32))[row:row + k] = val.numpy()
        row += k
    order = np.argsort(index, kind="stable")
    return BehaviourFeatures(index[order], {k: v[order] for k, v in delta.items()}, e_u[order], recent[order])


__all__ = ["DELTA_NAMES", "BehaviourFeatures", "DeviationVocab", "behaviour_features", "delta_from_hidden",
           "scoring_windows"]
