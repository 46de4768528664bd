"""Behaviour features from a trained generative model: Δ (deviation.py) and the user state, for every chosen
transaction, from one causal forward pass per window of a user's history (never one pass per transaction).

Windows. A user's chosen transactions (events with `want` set, the user's first event excluded: it has no
history) are cut into chunks of `chunk` = max_len − context consecutive events on a grid counted from the
user's first event: chunk k holds the events with k·chunk < p <= (k + 1)·chunk, p = the events before it
in the user's history. The events of chunk k are predicted from one window of inputs starting at the
user's event w0(p) = max(0, k·chunk − context) (`window_start`): the state at input position j − 1
predicts event j, so every prediction sees only strictly earlier events and at least `context` of them
(when the user has that many), and the window has at most chunk + context = max_len inputs. w0 depends
only on p, so adding or changing later events never changes an earlier transaction's features (tested),
and neither does the choice of events: an event's window is a function of the user's history alone, the
same in the train and the test pass, and the same the service's refresh keeps (serve/windows.py): a
user's window grows one event at a time and is re-based every `chunk` events, which is what lets the
refresh extend it incrementally instead of recomputing it.

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
    MAX_MARGINAL_CODES,
    Heads,
    PackedWidths,
    Prediction,
    deviation_features,
    field_members,
    field_onehot,
    head_features,
    observed_probability,
    predict,
)
from pantherseq.fraud.personal import (
    WINDOW_SIZES,
    CopyWeights,
    copy_features,
    copy_pointer,
    key_window,
    seen_counts,
    window_features,
    window_matrix,
)
from pantherseq.model.base import Batch, NeuralModel
from pantherseq.tokenizer import StructuredTokenizer

log = logging.getLogger(__name__)
WINDOW_ROWS = 65_536  # events per step of the short-window means (bounds the (rows, k) matrices)


def window_context(max_len: int, context: int) -> int:
    """The context the windows honour: `context` clipped to 1 .. max_len − 1 (chunks of at least one event)."""
    return int(min(max(context, 1), max_len - 1))


def window_start(p: np.ndarray | int, max_len: int, context: int) -> np.ndarray | int:
    """The first input (counted from the user's first event) of the window that predicts the user's event
    with `p` >= 1 events before it (the state after p events): max(0, ((p − 1) // chunk)·chunk − context),
    chunk = max_len − context (see the module doc). p - window_start(p) is between min(p, context + 1)
    and max_len."""
    context = window_context(max_len, context)
    chunk = max_len - context
    w0 = np.maximum(0, (np.asarray(p, dtype=np.int64) - 1) // chunk * chunk - context)
    return int(w0) if np.ndim(p) == 0 else w0


def scoring_windows(offsets: np.ndarray, want: np.ndarray, max_len: int, context: int
                    ) -> tuple[np.ndarray, int]:
    """(W, 3) int64 rows [w0, c0, c1] covering every wanted event that has history, and the chunk size.

    Each user's wanted events must be contiguous (a time range is). The rows are the user's grid chunks of
    max_len − context events (module doc) cut to the wanted range; w0 = the user's start + `window_start`."""
    context = window_context(max_len, context)
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
    k0 = (first[users] - starts[users] - 1) // chunk  # the grid chunks of the first and last wanted events
    n_chunks = (last[users] - starts[users] - 1) // chunk - k0 + 1
    u = np.repeat(users, n_chunks)
    k = np.repeat(k0, n_chunks) + np.arange(int(n_chunks.sum())) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    grid = starts[u] + 1 + k * chunk  # the chunk's first event on the user's grid
    c0 = np.maximum(grid, first[u])
    c1 = np.minimum(grid + chunk, last[u] + 1)
    w0 = starts[u] + window_start(grid - starts[u], max_len, context)
    return np.stack([w0, c0, c1], 1).astype(np.int64).reshape(-1, 3), chunk


@dataclass
class BehaviourFeatures:
    """Features of the events `index` (flat event indices, ascending): Δ by name, pooled and recent (N, D)."""

    index: np.ndarray
    delta: dict[str, np.ndarray]
    pooled: np.ndarray
    recent: np.ndarray


class DeviationVocab:
    """What the Δ need from the tokenizer and the model's output layers, float64: per-field token members, the
    one-hot tables of the token fields whose marginals a prediction keeps (numeric ones among them get the
    upper-tail surprisal), the output layer over the regular tokens, the field heads and the copy head
    (shared by the offline pass and the service: serve/scorer.py).

    `delta_names` lists every per-event feature `deviation` returns; `window_base` the ones whose short-window
    means are features too (`window_names`, fraud/personal.py): the token surprisal, the copy mixture's, and
    per field the field head's surprisal (the marginalised one without field heads). `widths`: the layout of
    a packed compact prediction (`pack` / `unpack`), what a serving state stores."""

    def __init__(self, tok: StructuredTokenizer, model: NeuralModel):
        v = tok.vocab_size - N_SPECIAL
        names = tok.field_names
        self.field_names = list(names)
        self.token_fields = list(tok.token_fields)
        self.code_cols = [names.index(n) for n in self.token_fields]
        token_codes = np.array([tok.token_codes(t) for t in range(N_SPECIAL, tok.vocab_size)],
                               dtype=np.int64).reshape(v, len(self.token_fields))
        sizes = [tok.field_sizes[c] for c in self.code_cols]
        self.members = [field_members(token_codes[:, f], sizes[f]) for f in range(len(self.token_fields))]
        kinds = {f.name: f.kind for f in tok.fields}
        self.onehots = {f: field_onehot(token_codes[:, f], sizes[f], torch.float64)
                        for f in range(len(self.token_fields)) if sizes[f] <= MAX_MARGINAL_CODES}
        self.ordered = frozenset(f for f in self.onehots if kinds.get(self.token_fields[f]) == "numeric")
        with torch.no_grad():
            self.weight = model.output_weight[N_SPECIAL:].detach().to(torch.float64).contiguous()  # (V, D)
            self.weight_t = self.weight.t().contiguous()  # (D, V)
            self.bias = model.out_bias[N_SPECIAL:].detach().to(torch.float64).contiguous()  # (V,)
            heads = model.field_heads.heads if model.field_heads is not None else []
            self.heads = Heads.of([(hd.weight, hd.bias) for hd in heads])
        self.widths = PackedWidths.of(v, {f: sizes[f] for f in self.onehots}, self.heads.sizes)
        self.copy = CopyWeights.of(model)
        self.reach = int(model.cfg.max_len)  # the serving state's window (fraud/personal.py)
        n_heads = len(self.heads.each)
        head_names = [f"head_{k}_{n}" for n in self.field_names[:n_heads] for k in ("surprisal", "rank")]
        self.delta_names = [*DELTA_NAMES, *(f"surprisal_{n}" for n in self.token_fields),
                            *(f"tail_{self.token_fields[f]}" for f in sorted(self.ordered)), *head_names,
                            *(["copy_gate", "copy_mass", "copy_surprisal"] if self.copy else []),
                            "seen_token", *(f"seen_{n}" for n in self.field_names)]
        per_field = ([f"head_surprisal_{n}" for n in self.field_names[:n_heads]] if n_heads
                     else [f"surprisal_{n}" for n in self.token_fields])
        self.window_base = ["surprisal", *(["copy_surprisal"] if self.copy else []), *per_field]
        self.window_names = [f"mean{k}_{n}" for k in WINDOW_SIZES for n in self.window_base]

    def predict(self, h: torch.Tensor) -> Prediction:
        """h (N, D) float32 -> the full Prediction at those positions (one N × D × V product)."""
        return predict(h, self.weight_t, self.bias, self.onehots, self.heads)

    def pack(self, pred: Prediction) -> np.ndarray:
        """(N, S) float64: the compact form of `pred`, as a serving state stores it."""
        return pred.compact().pack().numpy()

    def unpack(self, packed: np.ndarray, h: np.ndarray) -> Prediction:
        """One stored prediction (S,) and its state h (D,) -> the compact Prediction (N = 1); ValueError when
        it was packed for another model."""
        return Prediction.unpack(torch.from_numpy(np.asarray(packed, np.float64)).view(1, -1),
                                 torch.from_numpy(np.asarray(h, np.float32)).view(1, -1), self.widths)

    def deviation(self, pred: Prediction, tokens: torch.Tensor, codes: torch.Tensor, keys: torch.Tensor,
                  key_codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-event features (`delta_names`) of the observed events against `pred` (full or compact):
        tokens (N,), the codes of ALL fields (N, F), the events in reach before each (`key_window` /
        `state_keys`: keys (N, R), key_codes (N, R, F)) -> {name: (N,) float32}."""
        obs = torch.where(tokens >= N_SPECIAL, tokens - N_SPECIAL, torch.full_like(tokens, -1))
        observed = observed_probability(pred, self.weight, self.bias, obs)
        out = deviation_features(pred, self.weight, self.bias, obs, codes[:, self.code_cols], self.members,
                                 self.token_fields, self.ordered, observed)
        out |= head_features(pred, self.heads, codes, self.field_names)
        if self.copy is not None:
            a, g = copy_pointer(self.copy, pred.h, keys)
            out |= copy_features(a, g, keys, tokens, observed[1])
        return out | seen_counts(keys, key_codes, tokens, codes, self.field_names)

    def windows(self, past: dict[str, np.ndarray], now: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The short-window means (`window_names`) of N events: past {base: (N, max(WINDOW_SIZES) − 1)} the
        values of the events before each (oldest first, NaN = none), now {base: (N,)} their own."""
        return window_features({n: np.concatenate([past[n], np.asarray(now[n], np.float32)[:, None]], 1)
                                for n in self.window_base})


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


def delta_from_hidden(vocab: DeviationVocab, h: torch.Tensor, j: np.ndarray, seq_arrays: tuple, pos_chunk: int = 128
                      ) -> dict[str, torch.Tensor]:
    """h (N, D) float32 states that predict the events j (N,) (flat ids), seq_arrays (tokens (E,), codes
    (E, F), each event's user's first row (E,)) -> the per-event features by name (N,), `pos_chunk` rows at
    a time (the (n, V) and (n, reach, D) passes stay small)."""
    tokens, codes, starts = seq_arrays
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, h.shape[0], pos_chunk):
        jc = j[i:i + pos_chunk]
        keys, key_codes = key_window(tokens, codes, starts[jc], jc, vocab.reach)
        pred = vocab.predict(h[i:i + pos_chunk])
        feats = vocab.deviation(pred, torch.from_numpy(tokens[jc].astype(np.int64)),
                                torch.from_numpy(codes[jc].astype(np.int64)), keys, key_codes)
        for k, val in feats.items():
            parts.setdefault(k, []).append(val)
    return {k: torch.cat(v) for k, v in parts.items()}


def extend_back(offsets: np.ndarray, want: np.ndarray, n: int) -> np.ndarray:
    """`want` with each user's `n` events before their first wanted one set too (within the user)."""
    want = np.asarray(want, dtype=bool)
    out = want.copy()
    if n <= 0 or not want.any():
        return out
    starts, ends = offsets[:-1].astype(np.int64), offsets[1:].astype(np.int64)
    cum = np.concatenate([[0], np.cumsum(want)])
    has = cum[ends] > cum[starts]
    first = np.flatnonzero(want)[cum[starts[has]]]
    lo = np.maximum(starts[has], first - n)
    mark = np.zeros(len(want) + 1, np.int64)
    np.add.at(mark, lo, 1)
    np.add.at(mark, first, -1)
    return out | (np.cumsum(mark)[:-1] > 0)


@torch.no_grad()
def behaviour_features(model: NeuralModel, data: RunData, want: np.ndarray, context: int = 100,
                       batch_windows: int = 64, pos_chunk: int = 128, lookback: int | None = None
                       ) -> BehaviourFeatures:
    """Δ, the pooled and the recent state for every wanted event that has history (see the module doc).

    The short-window means need the Δ of each user's `lookback` (max(WINDOW_SIZES) − 1) events before the
    first wanted one: they are computed too (in the same windows), then left out of the result."""
    model.eval()
    model64 = float64_copy(model)
    max_len = model.cfg.max_len
    seq = data.seq
    offsets = np.asarray(seq.offsets).astype(np.int64)
    lookback = max(WINDOW_SIZES) - 1 if lookback is None else int(lookback)
    wanted = np.asarray(want, dtype=bool)
    windows, _ = scoring_windows(offsets, extend_back(offsets, wanted, lookback), max_len, context)
    vocab = DeviationVocab(data.tokenizer, model)
    starts = np.repeat(offsets[:-1], np.diff(offsets))  # each event's user's first row
    arrays = (np.asarray(seq.tokens), np.asarray(seq.codes), starts)
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
        feats = delta_from_hidden(vocab, hs, j, arrays, pos_chunk)
        k = len(j)
        index[row:row + k] = j
        pooled[row:row + k] = running_mean(h)[rt, pt].to(torch.float32).numpy()
        recent[row:row + k] = hs.numpy()
        for name, val in feats.items():
            delta.setdefault(name, np.empty(n, dtype=np.float32))[row:row + k] = val.numpy()
        row += k
    order = np.argsort(index, kind="stable")
    index, delta = index[order], {k: v[order] for k, v in delta.items()}
    if delta:  # the window means, from each event's own Δ and its predecessors', WINDOW_ROWS events at a time
        kmax, first = max(WINDOW_SIZES), starts[index]
        for name in vocab.window_names:
            delta[name] = np.empty(n, dtype=np.float32)
        for a in range(0, n, WINDOW_ROWS):
            rows = slice(a, a + WINDOW_ROWS)
            mats = {name: window_matrix(index, delta[name], first, kmax, rows) for name in vocab.window_base}
            means = vocab.windows({k: v[:, :-1] for k, v in mats.items()}, {k: v[:, -1] for k, v in mats.items()})
            for name, val in means.items():
                delta[name][rows] = val
    keep = wanted[index]
    return BehaviourFeatures(index[keep], {k: v[keep] for k, v in delta.items()}, pooled[order][keep],
                             recent[order][keep])


__all__ = ["DELTA_NAMES", "BehaviourFeatures", "DeviationVocab", "behaviour_features", "delta_from_hidden",
           "exact_hidden", "extend_back", "final_states", "float64_copy", "running_mean", "scoring_windows"]
