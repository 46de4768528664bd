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
- `pooled`: the mean of the causal states over the window's inputs up to j − 1, i.e. `model.embed()` of
  the window [w0, j) (tested to be equal): the pooled recent history of up to max_len events (not the
  profile embedding e_u of model/profile.py);
- `recent`: the causal state h_{j−1} itself, the model's encoding of the last events before j (with the
  default context of 100 it attends to at least the last 100 events when the user has them). It is
  also the vector the next-token prediction is made from.

Exactness. The states come from a float64 copy of the model (`float64_copy`, `exact_hidden`) and are rounded
to float32 once: a batch of windows padded to different lengths and one user's window alone run through
kernels that sum in other orders, and in float32 that moves h by ~1e-7, enough to flip a tree split of the
risk model; in float64 it stays ~1e-16 and the rounded float32 states agree (deviation.py's module doc).
The service (serve/scorer.py) calls the same functions, so its features equal these.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from pantherseq.data.dataset import RunData
from pantherseq.data.schema import N_SPECIAL
from pantherseq.fraud.deviation import (
    DELTA_NAMES,
    Prediction,
    deviation_features,
    field_members,
    field_onehot,
    predict,
)
from pantherseq.model.base import Batch, NeuralModel
from pantherseq.tokenizer import StructuredTokenizer

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
    """Features of the events `index` (flat event indices, ascending): Δ by name, pooled and recent (N, D)."""

    index: np.ndarray
    delta: dict[str, np.ndarray]
    pooled: np.ndarray
    recent: np.ndarray


class DeviationVocab:
    """What the Δ need from the tokenizer and the model's output layer, float64: per-field token members, the
    ordered fields' one-hot tables and the head over the regular tokens (shared by the offline pass and the
    service: serve/scorer.py)."""

    def __init__(self, tok: StructuredTokenizer, model: NeuralModel):
        v = tok.vocab_size - N_SPECIAL
        names = tok.field_names
        self.token_fields = list(tok.token_fields)
        self.code_cols = [names.index(n) for n in self.token_fields]
        token_codes = np.array([tok.token_codes(t) for t in range(N_SPECIAL, tok.vocab_size)],
                               dtype=np.int64).reshape(v, len(self.token_fields))
        sizes = [tok.field_sizes[c] for c in self.code_cols]
        self.members = [field_members(token_codes[:, f], sizes[f]) for f in range(len(self.token_fields))]
        kinds = {f.name: f.kind for f in tok.fields}
        self.ordered = {f: field_onehot(token_codes[:, f], sizes[f], torch.float64)
                        for f, n in enumerate(self.token_fields)
                        if kinds.get(n) == "numeric" and sizes[f] <= MAX_ORDERED_CODES}
        with torch.no_grad():
            self.weight = model.output_weight[N_SPECIAL:].detach().to(torch.float64).contiguous()  # (V, D)
            self.weight_t = self.weight.t().contiguous()  # (D, V)
            self.bias = model.out_bias[N_SPECIAL:].detach().to(torch.float64).contiguous()  # (V,)
        self.delta_names = [*DELTA_NAMES, *(f"surprisal_{n}" for n in self.token_fields),
                            *(f"tail_{self.token_fields[f]}" for f in self.ordered)]

    def predict(self, h: torch.Tensor) -> Prediction:
        """h (N, D) float32 -> the Prediction at those positions."""
        return predict(h, self.weight_t, self.bias, self.ordered)

    def deviation(self, pred: Prediction, tokens: torch.Tensor, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Δ of the observed events (tokens (N,), token-field codes (N, Ft)) against `pred` -> {name: (N,)}."""
        obs = torch.where(tokens >= N_SPECIAL, tokens - N_SPECIAL, torch.full_like(tokens, -1))
        return deviation_features(pred, self.weight, obs, codes, self.members, self.token_fields)


def float64_copy(model: NeuralModel) -> NeuralModel:
    """A float64 copy of the model, in eval mode, for the scoring passes (see the module doc)."""
    return copy.deepcopy(model).to(torch.float64).eval()


def exact_hidden(model64: NeuralModel, batch: Batch) -> torch.Tensor:
    """(B, T, D) float64 causal states of a float64 model (`float64_copy`)."""
    cast = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    cast = {k: (v.to(torch.float64) if v is not None and v.is_floating_point() else v) for k, v in cast.items()}
    return model64.hidden(Batch(**cast))


def running_mean(h: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (B, T, D): at t, the mean of the states 0..t (the pooled history up to t)."""
    T = h.shape[1]
    return h.cumsum(1) / torch.arange(1, T + 1, dtype=h.dtype).view(1, T, 1)


def final_states(model64: NeuralModel, batch: Batch, lens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The state after each window's last input, as serving keeps it: h (B, D) and the pooled state (B, D),
    float32, from one float64 pass over the right-padded windows of `lens` (B,) real inputs each, rounded
    once (the refresh worker, `embed` and `predict` call this)."""
    hid = exact_hidden(model64, batch)  # (B, T, D) float64
    rows, last = torch.arange(len(lens)), torch.as_tensor(np.asarray(lens) - 1, dtype=torch.long)
    return hid[rows, last].to(torch.float32), running_mean(hid)[rows, last].to(torch.float32)


def delta_from_hidden(vocab: DeviationVocab, h: torch.Tensor, tokens: torch.Tensor, codes: torch.Tensor,
                      pos_chunk: int = 128) -> dict[str, torch.Tensor]:
    """h (N, D) float32 states that predict the observed events, their tokens (N,) and token-field codes
    (N, Ft) -> Δ by name (N,), `pos_chunk` rows at a time (the (n, V) passes stay small)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, h.shape[0], pos_chunk):
        pred = vocab.predict(h[i:i + pos_chunk])
        for k, val in vocab.deviation(pred, tokens[i:i + pos_chunk], codes[i:i + pos_chunk]).items():
            parts.setdefault(k, []).append(val)
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def behaviour_features(model: NeuralModel, data: RunData, want: np.ndarray, context: int = 100,
                       batch_windows: int = 64, pos_chunk: int = 128) -> BehaviourFeatures:
    """Δ, the pooled and the recent state for every wanted event that has history (see the module doc)."""
    model.eval()
    model64 = float64_copy(model)
    max_len = model.cfg.max_len
    seq = data.seq
    windows, _ = scoring_windows(np.asarray(seq.offsets), want, max_len, context)
    vocab = DeviationVocab(data.tokenizer, model)
    tokens_all = np.asarray(seq.tokens)
    codes_all = np.asarray(seq.codes)[:, vocab.code_cols]
    n = int((windows[:, 2] - windows[:, 1]).sum())
    index = np.empty(n, dtype=np.int64)
    d = model.cfg.d_model
    pooled = np.empty((n, d), dtype=np.float32)
    recent = np.empty((n, d), dtype=np.float32)
    delta: dict[str, np.ndarray] = {}
    row = 0
    log.info("behaviour features: %d events in %d windows", n, len(windows))
    step = max(len(windows) // 10 // batch_windows * batch_windows, batch_windows)
    for b in range(0, len(windows), batch_windows):
        if b and b % step == 0 and len(windows) > 20 * batch_windows:
            log.info("behaviour features: %d of %d windows", b, len(windows))
        w = windows[b:b + batch_windows]
        h = exact_hidden(model64, data._batch(w[:, 0], w[:, 2] - 1 - w[:, 0]))  # (B, T, D) float64
        m = w[:, 2] - w[:, 1]
        r = np.repeat(np.arange(len(w)), m)
        j = np.concatenate([np.arange(c0, c1) for c0, c1 in zip(w[:, 1], w[:, 2])])  # target events
        p = j - 1 - w[r, 0]  # input position that predicts event j
        rt, pt = torch.from_numpy(r), torch.from_numpy(p)
        hs = h[rt, pt].to(torch.float32)  # (n, D): rounded once
        feats = delta_from_hidden(vocab, hs, torch.from_numpy(tokens_all[j].astype(np.int64)),
                                  torch.from_numpy(codes_all[j].astype(np.int64)), pos_chunk)
        k = len(j)
        index[row:row + k] = j
        pooled[row:row + k] = running_mean(h)[rt, pt].to(torch.float32).numpy()
        recent[row:row + k] = hs.numpy()
        for name, val in feats.items():
            delta.setdefault(name, np.empty(n, dtype=np.float32))[row:row + k] = val.numpy()
        row += k
    order = np.argsort(index, kind="stable")
    return BehaviourFeatures(index[order], {k: v[order] for k, v in delta.items()}, pooled[order], recent[order])


__all__ = ["DELTA_NAMES", "BehaviourFeatures", "DeviationVocab", "behaviour_features", "delta_from_hidden",
           "exact_hidden", "final_states", "float64_copy", "running_mean", "scoring_windows"]
