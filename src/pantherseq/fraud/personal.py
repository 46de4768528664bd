"""What the model knows of a user's own past, as fraud features (issue 13, part 1): the copy head's view of
the observed event, new-vs-known counts, and short-window means of the surprisals.

    key_window(tokens, codes, starts, j, reach)     offline: each event's last `reach` events (right-aligned)
    state_keys(tokens, codes, reach)                online: the same from the serving state's window
    seen_counts(keys, key_codes, token, codes)      how often the observed token / each field value occurred
    CopyWeights.of(model)                           the copy head's weights, float64
    copy_pointer(cw, h, keys) -> (a, g)             the pointer over the keys and the gate, from h
    copy_features(a, g, keys, token, p_obs)         copy_gate, copy_mass, copy_surprisal
    window_matrix(index, values, starts, k)         offline: each event's value and its k − 1 predecessors'
    window_means(values)                            the mean over a (N, k) window, NaN = none
    window_features(windows)                        mean<k>_<name> for k in WINDOW_SIZES, both paths

Reach. The copy features and the seen counts read the user's last `reach` events strictly before the event,
reach = the model's max_len: exactly the window the serving state keeps (serve/state.py `tokens`, `codes`),
so the service needs nothing more, and the offline value does not depend on the fraud pass's windows. The
copy head itself can also see `history` (512) events further back while training; these features do not.

Copy features (model/heads.py CopyHead, RepeatNet-style), from the state h that predicts the event:
a_r = softmax_r(q · k_r / √D + b(bucket(distance))) over the keys (PAD / UNK / special ids are no keys),
q = W_q h, k_r = W_k e(key_r); g = sigmoid(w_g · h + b_g) (0 without a key).
- `copy_gate` g: how much the model expected a repeat of the user's own past;
- `copy_mass` Σ_r a_r [key_r = observed token]: the pointer's mass on the observed token (0 = never seen
  in the reach); NaN when the observed token is UNK;
- `copy_surprisal` −log((1 − g) P_vocab(x) + g · copy_mass): the surprisal under the copy mixture, the
  model's own prediction when it has a copy head (P_vocab the softmax over the regular tokens).
Seen counts (`seen_token`, `seen_<field>` for every field): the number of events in the reach with the
observed token / field code; 0 = new to the user (a merchant, a category, an hour never used), NaN for the
UNK token / code 0 (unknown values cannot be matched). Integer counts: exact on every path.

Short windows. `mean<k>_<name>` = the mean of a per-event Δ over the event itself and the user's k − 1
events before it (the current event INCLUDED, as the customer spending windows include it: its amount and
what it is are known at decision time), skipping the undefined ones (a user's first event, an UNK token's
surprisal); NaN when none is defined. A compromised fortnight is a run of surprising events, not one. Each
past event's Δ is the one it got from its own history (offline from the fraud pass; online as scored, kept
in the serving state). The sum runs over the window's columns oldest first, one elementwise float64
addition per column on both paths, so it does not depend on any kernel's summation order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from pantherseq.data.schema import N_SPECIAL, PAD
from pantherseq.fraud.deviation import NAN, _neg_log, as_float32
from pantherseq.model.heads import distance_buckets

WINDOW_SIZES = (5, 20)


def key_window(tokens: np.ndarray, codes: np.ndarray, starts: np.ndarray, j: np.ndarray, reach: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat event arrays tokens (E,), codes (E, F), each target event j (N,) and its user's first row
    starts (N,) -> keys (N, R) int64 and key_codes (N, R, F) int64 of the events [j − R, j) of the same user,
    right-aligned (column R − 1 is the event just before j), PAD / code 0 where the user has none."""
    idx = j[:, None] - reach + np.arange(reach)[None, :]  # (N, R)
    ok = idx >= starts[:, None]
    safe = np.where(ok, idx, 0)
    keys = np.where(ok, tokens[safe], PAD).astype(np.int64)
    kc = np.where(ok[:, :, None], codes[safe], 0).astype(np.int64)
    return torch.from_numpy(keys), torch.from_numpy(kc)


def state_keys(tokens: np.ndarray, codes: np.ndarray, reach: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The serving state's last events (tokens (L,), codes (L, F), oldest first) -> keys (1, R), key_codes
    (1, R, F) as `key_window` lays them out."""
    f = codes.shape[1] if codes.ndim == 2 else 0
    t, c = np.asarray(tokens, np.int64)[-reach:], np.asarray(codes, np.int64).reshape(-1, f)[-reach:]
    keys = np.full((1, reach), PAD, np.int64)
    kc = np.zeros((1, reach, f), np.int64)
    if len(t):
        keys[0, reach - len(t):] = t
        kc[0, reach - len(c):] = c
    return torch.from_numpy(keys), torch.from_numpy(kc)


def seen_counts(keys: torch.Tensor, key_codes: torch.Tensor, token: torch.Tensor, codes: torch.Tensor,
                names: list[str]) -> dict[str, torch.Tensor]:
    """keys (N, R), key_codes (N, R, F), the observed token (N,) (full ids) and codes (N, F) ->
    {`seen_token`, `seen_<field>`: (N,) float32} counts in the reach; NaN for UNK / code 0."""
    counts = torch.cat([(keys == token[:, None]).sum(1, keepdim=True),
                        (key_codes == codes[:, None, :]).sum(1)], 1).to(torch.float32)  # (N, 1 + F), exact
    valid = torch.cat([(token >= N_SPECIAL)[:, None], codes > 0], 1)
    return dict(zip(["seen_token", *(f"seen_{n}" for n in names)], torch.where(valid, counts, NAN).unbind(1)))


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64).contiguous()


@dataclass
class CopyWeights:
    """The copy head in float64: W_q (D, D), every token's key vector W_k e(v) (V_all, D), the distance
    bias (buckets,), the gate's w (D,) and b ()."""

    w_q: torch.Tensor
    key_vec: torch.Tensor
    dist_bias: torch.Tensor
    gate_w: torch.Tensor
    gate_b: torch.Tensor
    by_reach: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # R -> distance bias (1, R)

    def distance_bias(self, reach: int) -> torch.Tensor:
        """(1, R): the bias of key column r, R − 1 − r events before the predicting position (made once per R)."""
        bias = self.by_reach.get(reach)
        if bias is None:
            dist = torch.arange(reach - 1, -1, -1)
            bias = self.by_reach[reach] = self.dist_bias[distance_buckets(dist)].unsqueeze(0)
        return bias

    @classmethod
    def of(cls, model) -> CopyWeights | None:
        head = getattr(model, "copy", None)
        if head is None:
            return None
        with torch.no_grad():
            d = _f64
            emb = d(model.token_emb.weight)
            return cls(d(head.w_q.weight), emb @ d(head.w_k.weight).t(), d(head.distance_bias.weight[:, 0]),
                       d(head.gate.weight[0]), d(head.gate.bias[0]))


def copy_pointer(cw: CopyWeights, h: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h (N, D) float64 states, keys (N, R) right-aligned -> a (N, R) pointer weights (rows sum to 1, or 0
    without a key) and g (N,) the gate (0 without a key), float64."""
    R = keys.shape[1]
    q = h @ cw.w_q.t()  # (N, D)
    k = cw.key_vec[keys]  # (N, R, D)
    s = torch.einsum("nd,nrd->nr", q, k) / math.sqrt(h.shape[1])
    s = s + cw.distance_bias(R)
    visible = keys >= N_SPECIAL
    any_key = visible.any(1)
    s = s.masked_fill(~visible, float("-inf")).masked_fill(~any_key.unsqueeze(1), 0.0)
    a = torch.softmax(s, dim=1) * any_key.unsqueeze(1)
    g = torch.sigmoid(h @ cw.gate_w + cw.gate_b) * any_key
    return a, g


def copy_features(a: torch.Tensor, g: torch.Tensor, keys: torch.Tensor, token: torch.Tensor, p_obs: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
    """a (N, R), g (N,) from `copy_pointer`, the observed token (N,) (full ids), p_obs (N,) its probability
    under the vocabulary softmax (NaN when UNK) -> {copy_gate, copy_mass, copy_surprisal} (N,) float32."""
    known = token >= N_SPECIAL
    mass = (a * (keys == token[:, None])).sum(1)
    mix = (1.0 - g) * p_obs + g * mass
    return as_float32({"copy_gate": g, "copy_mass": torch.where(known, mass, NAN),
                    "copy_surprisal": torch.where(known, _neg_log(mix, 1e-38), NAN)})


def window_matrix(index: np.ndarray, values: np.ndarray, starts: np.ndarray, k: int, rows: slice = slice(None)
                  ) -> np.ndarray:
    """Offline: events `index` (ascending flat ids) with a value each (n,), their users' first rows
    starts (n,) -> (m, k) float32 for the m events index[rows]: row i = the values of the events
    index[i] − k + 1 .. index[i] (oldest first), NaN where the event is another user's or has no value."""
    at = index[rows]
    want = at[:, None] - (k - 1) + np.arange(k)[None, :]  # (m, k)
    pos = np.searchsorted(index, want).clip(0, max(len(index) - 1, 0))
    ok = (want >= starts[rows][:, None]) & (index[pos] == want) if len(index) else np.zeros(want.shape, bool)
    return np.where(ok, values[pos], np.float32(np.nan)).astype(np.float32)


def window_means(values: np.ndarray) -> np.ndarray:
    """(N, k) float32, oldest first, NaN = none -> (N,) float32 mean of the defined values (NaN if none).
    One elementwise float64 addition per column, in column order: the same on every path."""
    v = np.asarray(values, dtype=np.float32).astype(np.float64)
    ok = ~np.isnan(v)
    # a running sum is sequential, column by column (np.add.accumulate): the loop's additions, in one call
    acc = np.add.accumulate(np.where(ok, v, 0.0), axis=1)[:, -1] if v.shape[1] else np.zeros(v.shape[0])
    cnt = ok.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, acc / np.maximum(cnt, 1), np.nan).astype(np.float32)


def window_features(windows: dict[str, np.ndarray], sizes: tuple[int, ...] = WINDOW_SIZES
                    ) -> dict[str, np.ndarray]:
    """{name: (N, max(sizes)) values, oldest first, the current event last} -> {`mean<k>_<name>`: (N,)
    float32}: the offline pass and the service call this with the same layout. Every name's rows go
    through one `window_means` per k (elementwise, so the values are those of one call per name)."""
    names = list(windows)
    if not names:
        return {}
    stacked = np.stack([np.asarray(windows[n], np.float32) for n in names])  # (B, N, K)
    b, n, width = stacked.shape
    means = {k: window_means(stacked[:, :, width - k:].reshape(b * n, k)).reshape(b, n) for k in sizes}
    return {f"mean{k}_{name}": means[k][i] for k in sizes for i, name in enumerate(names)}


__all__ = ["WINDOW_SIZES", "CopyWeights", "copy_features", "copy_pointer", "key_window", "seen_counts",
           "state_keys", "window_features", "window_matrix", "window_means"]
