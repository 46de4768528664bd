"""Deviation features Δ (SPEC §7, paper §3.1 Stage 2 and §4.1): how far an observed transaction is from the
behaviour the generative model predicted for its user, given the user's history strictly before it.

Every feature is computed from the model's prediction at N positions over the V regular tokens (the special
ids PAD/UNK/BOS/PROFILE are never candidates: a model trained with UNK targets excluded gives the UNK logit no
meaning) and the observed token's index among them, `obs` (N,) int64, with -1 where the observed event is
UNK (outside the vocabulary). Each is (N,) float32, NaN where it is undefined.

    surprisal        −log P(x_new | history) = log Z − l_obs, l_obs = h·w_obs + b_obs the observed logit
    rank             1 + the number of tokens scored higher than the observed one, capped at RANK_CAP + 1
    delta_std        the paper's Δ = (P_u(x_new) − μ_u) / σ_u, μ_u and σ_u the mean and (population) std of
                     the predicted probabilities over the V tokens; μ_u = 1/V since they sum to one
    entropy2         −log Σ p², how spread the prediction was (one pass with σ)
    surprisal_<f>    −log P(field f = observed value): the token distribution marginalised over the tokens
                     sharing the observed value
    tail_<f>         −log P(field >= observed bucket) for ordered (numeric) token fields: the one-sided
                     surprise of an amount this high
    emb_distance     1 − cos(h, the observed token's output embedding)
    head_surprisal_<f>, head_rank_<f>   the same from the per-field heads (every field, token or not)

The prediction, computed once per position (`predict`: one N × D × V product, float64), and compact.
A `Prediction` holds what no observed event changes: h, log Z, Σp², the marginals of the token fields with
at most MAX_MARGINAL_CODES values, the field heads' log-normalisers, and the scores the ranks count — every
logit (`predict`) or only the RANK_CAP highest, descending (`Prediction.compact`). What depends on the
observed event is then read with dot products of h, never a pass over V: the observed token's logit, the
logits of the tokens sharing a large field's value (`field_members`: a terminal is carried by its few amount
buckets) and the heads' logit of the observed code. So a compact prediction (about 17 KB at V = 60,004, where
P itself is 480 KB) is all the service keeps per user: the refresh worker stores it in the user's state
(`pack` / `unpack`) and a request costs a few dot products (serve/scorer.py).

Ranks are capped so that the compact form gives the same rank as the full one: the count of higher scores
among every logit, or among the RANK_CAP highest, is the same number whenever it is below RANK_CAP, and both
are reported as RANK_CAP + 1 otherwise (beyond the top 1,024 tokens the surprisal says how unlikely the
event was). "Higher" means higher by more than TIE relative: the observed logit computed from h by a dot
product and the same logit in the batched product differ in the last bits; a tie within 1e-12 is that
rounding, not the model.

One implementation for the batch and for one event. `pantherseq fraud` calls `deviation_features` on chunks
of full predictions, the service on the compact prediction its state stores: the same functions on tensors
of other shapes. Everything is computed in float64 from the float32 state h and rounded to float32 once, at
the end: kernels over differently shaped tensors may sum in other orders, and in float64 those differences
are ~1e-16 relative and vanish in the final rounding (two results can round apart only when one lies within
~1e-16 of a float32 rounding boundary: ~1e-9 per value), so the risk model sees the same features online as
offline, on any CPU.

Per-field surprisal, marginalised. Every model predicts tokens, each token a combination of the token
fields' values (`tokenizer.token_codes`). The probability of a field value is the sum of the probabilities of
the tokens carrying it (`field_members` lists them per value); an event's own field code is known even when
its token is UNK (`sequences/codes.npy`), so per-field surprisal is defined for UNK events too. A value no
vocabulary token carries (or the field's own UNK code 0) has no predicted mass: the surprisal is then NaN
rather than a made-up floor; masses are clamped at 1e-12 before the log otherwise.

Per-field surprisal and rank from the field heads. A model with `field_heads` (model/heads.py) also predicts
the next event's code of EVERY field (token fields and the others: merchant, hour, weekday...) with a head
of its own, trained on UNK events too. Code 0 (the field's UNK) is never a target and never a candidate: its
surprisal and rank are NaN.

UNK observed events. Their token-level features (surprisal, rank, Δ, distance) are NaN, the flag `is_unk`
is 1, and the per-field surprisals still say whether the amount and the merchant were expected. LightGBM
treats NaN as missing and learns its own branch for it. The predicted vector for the distance is the
model's hidden state h_t (logit_v = h_t · w_v + b_v, so h_t is the direction the model expects).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

MASS_FLOOR = 1e-12
RANK_CAP = 1024  # ranks above are reported as RANK_CAP + 1 (the module doc)
TIE = 1e-12  # scores within this relative distance of the observed one are not counted as higher
MAX_MARGINAL_CODES = 256  # token fields with at most this many codes keep their whole marginal


NAN = float("nan")  # torch.where(cond, x, NAN): NaN in x's dtype, no tensor made per call


def _neg_log(mass: torch.Tensor, floor: float) -> torch.Tensor:
    """−log of probability masses, each rounded to float32 first. A mass that is 1 up to the float64 error
    (a certain prediction, the lowest bucket's upper tail) would give ±1e-16, whose sign depends on the
    summation order; rounded, it is exactly 1 and the surprisal exactly 0 on every path."""
    return -torch.log(mass.clamp_min(floor).to(torch.float32).to(mass.dtype))


def logit_at(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """h (N, D), an output layer's weight (C, D) and bias (C,), idx (N,) (or (N, K)) rows of it -> the logits
    h_i · w_idx + b_idx, (N,) (or (N, K)); a negative idx reads row 0 (the caller masks it)."""
    i = idx.clamp_min(0)
    if i.dim() == 1:
        return (h * weight[i]).sum(1) + bias[i]
    return torch.einsum("nd,nkd->nk", h, weight[i]) + bias[i]


def rank_above(scores: torch.Tensor, logit: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
    """scores (N, M) logits (every candidate, or the highest ones), logit (N,) the observed one -> (N,)
    1 + min(#scores higher by more than TIE relative, RANK_CAP): the same number from every logit and from
    the RANK_CAP highest (the module doc). With `segments` (M,): logit (N, H), and score column m is
    compared with logit column segments[m] (several heads' scores side by side) -> (N, H)."""
    thr = logit + TIE * logit.abs().clamp_min(1.0)
    if segments is None:
        higher = torch.gt(scores, thr.unsqueeze(1)).sum(1, dtype=torch.int64)
    else:
        above = torch.gt(scores, thr[:, segments]).to(torch.int64)
        higher = torch.zeros(thr.shape, dtype=torch.int64).index_add_(1, segments, above)
    return 1.0 + higher.clamp_max(RANK_CAP).to(logit.dtype)


def standardised_deviation(p_obs: torch.Tensor, sum_sq: torch.Tensor, v: int) -> torch.Tensor:
    """(P(obs) − μ) / σ over V probabilities summing to one: μ = 1/V, σ the population std sqrt(Σp²/V − μ²)
    (floored at 1e-12), from P(obs) (N,) and Σp² (N,)."""
    mu = 1.0 / v
    sd = (sum_sq / v - mu * mu).clamp_min(0).sqrt().clamp_min(1e-12)
    return (p_obs - mu) / sd


def collision_entropy(sum_sq: torch.Tensor) -> torch.Tensor:
    """(N,) Rényi-2 entropy −log Σ p² from Σp²: how spread the prediction is (0 when certain, log V when
    uniform). Used instead of the Shannon entropy because it comes from the same pass as σ."""
    return _neg_log(sum_sq, 1e-38)


def field_members(token_codes: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """token_codes (V,) field code of each regular token, size = codes of the field (0 = its UNK) ->
    (ids, valid), both (size, K): row c lists the tokens whose field code is c (K = the most tokens any
    code has), padded with id 0 where `valid` is False."""
    token_codes = np.asarray(token_codes, dtype=np.int64)
    v = len(token_codes)
    counts = np.bincount(token_codes, minlength=size)[:size]
    k = max(int(counts.max()) if len(counts) else 0, 1)
    ids = np.zeros((size, k), dtype=np.int64)
    valid = np.zeros((size, k), dtype=bool)
    order = np.argsort(token_codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sorted_codes = token_codes[order]
    slot = np.arange(v) - starts[sorted_codes]
    ids[sorted_codes, slot] = order
    valid[sorted_codes, slot] = True
    return torch.from_numpy(ids), torch.from_numpy(valid)


def _in_table(obs_code: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(known code? (N,) bool, the code clamped into 0 .. size − 1): code 0 (the field's UNK) and codes
    outside the table are not known."""
    return (obs_code > 0) & (obs_code < size), obs_code.clamp(0, size - 1)


def member_mass(h: torch.Tensor, log_z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                obs_code: torch.Tensor, members: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(N,) P(field = obs_code) = Σ over the tokens carrying the code of exp(l_v − log Z), their logits read
    from h (no pass over V); 0 for code 0 (the field's UNK) or a code outside the table."""
    ids, valid = members
    ok, c = _in_table(obs_code, ids.shape[0])
    logits = logit_at(h, weight, bias, ids[c])  # (N, K)
    mass = (torch.exp(logits - log_z.unsqueeze(1)) * valid[c]).sum(1)
    return torch.where(ok, mass, torch.zeros_like(mass))


def marginal_mass(marginal: torch.Tensor, obs_code: torch.Tensor) -> torch.Tensor:
    """marginal (N, C) P(field = c), obs_code (N,) -> (N,) P(field = obs_code); 0 for code 0 or outside."""
    ok, c = _in_table(obs_code, marginal.shape[1])
    mass = marginal.gather(1, c.unsqueeze(1)).squeeze(1)
    return torch.where(ok, mass, torch.zeros_like(mass))


def mass_surprisal(mass: torch.Tensor) -> torch.Tensor:
    """(N,) −log of a field value's predicted mass; NaN where no token carries it (mass 0)."""
    return torch.where(mass > 0, _neg_log(mass, MASS_FLOOR), NAN)


def field_marginal(p: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """p (N, V), onehot (V, C) float (token -> its field code) -> (N, C) P(field = c) for every code c."""
    return p @ onehot


def upper_tail_surprisal(marginal: torch.Tensor, obs_code: torch.Tensor) -> torch.Tensor:
    """For an ordered field (numeric buckets, codes 1..C-1 increasing): −log P(field >= observed code), the
    one-sided surprise of a value this *high* (an amount spike), where plain surprisal is two-sided.
    marginal (N, C), obs_code (N,) -> (N,); NaN for code 0 (the field's UNK)."""
    tail = marginal.flip(1).cumsum(1).flip(1)  # (N, C): P(field >= c)
    c = obs_code.clamp(0, marginal.shape[1] - 1)
    val = tail.gather(1, c.unsqueeze(1)).squeeze(1)
    out = _neg_log(val, MASS_FLOOR)
    return torch.where(obs_code > 0, out, NAN)


def field_onehot(token_codes: np.ndarray, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(V, size): row v is the one-hot code of token v for the field."""
    out = torch.zeros(len(token_codes), size, dtype=dtype)
    out[torch.arange(len(token_codes)), torch.from_numpy(np.asarray(token_codes, dtype=np.int64))] = 1.0
    return out


def embedding_distance(pred: torch.Tensor, weight: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """pred (N, D) predicted vectors, weight (V, D) token embeddings -> (N,) 1 − cos(pred, weight[obs])."""
    w = weight[obs.clamp_min(0)].to(pred.dtype)
    cos = torch.nn.functional.cosine_similarity(pred, w, dim=1, eps=1e-12)
    return torch.where(obs >= 0, 1.0 - cos, NAN)


@dataclass
class Heads:
    """The per-field heads' output layers, float64: W^T (D, ΣC) and b (ΣC,) for one product over every head,
    W (ΣC, D) for reading the observed codes' logits, and each head's own (W (C_f, D), b (C_f,))."""

    weight_t: torch.Tensor
    bias: torch.Tensor
    each: list[tuple[torch.Tensor, torch.Tensor]]
    weight: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.float64))
    segments: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, heads: list[tuple[torch.Tensor, torch.Tensor]]) -> Heads:
        each = [(w.detach().to(torch.float64).contiguous(), b.detach().to(torch.float64).contiguous())
                for w, b in heads]
        if not each:
            return cls(torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), [])
        weight = torch.cat([w for w, _ in each]).contiguous()
        return cls(weight.t().contiguous(), torch.cat([b for _, b in each]), each, weight)

    @property
    def sizes(self) -> list[int]:
        return [len(b) for _, b in self.each]

    def rows(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """codes (N, H) observed codes of the fields with a head -> (known? (N, H) bool, (N, H) their rows
        of `weight` / `bias`); code 0 (the field's UNK) and codes outside a head are not known (row of 0)."""
        size = torch.tensor(self.sizes)
        offset = torch.cumsum(size, 0) - size
        ok = (codes > 0) & (codes < size)
        return ok, torch.where(ok, codes, 0) + offset

    def segment(self, widths: list[int]) -> torch.Tensor:
        """(ΣM,) the head of each column of the heads' scores side by side (widths M_f), made once."""
        key = tuple(widths)
        seg = self.segments.get(key)
        if seg is None:
            seg = self.segments[key] = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths))
        return seg


@dataclass
class Prediction:
    """The model's prediction at N positions, float64: what every Δ of the next event needs that does not
    depend on that event (the module doc):

        h (N, D) the states, log_z (N,) log Σ exp(logits) over V, sum_sq (N,) Σp²,
        scores (N, M) the logits the rank counts: all V (`predict`) or the RANK_CAP highest (`compact`),
        marginals {token field f: (N, C_f) P(field = c)} for the fields with at most MAX_MARGINAL_CODES codes,
        head_log_z [(N,)] and head_scores [(N, M_f)] the same per field head (codes >= 1 only)
    """

    h: torch.Tensor
    log_z: torch.Tensor
    sum_sq: torch.Tensor
    scores: torch.Tensor
    marginals: dict[int, torch.Tensor]
    head_log_z: list[torch.Tensor]
    head_scores: list[torch.Tensor]

    def compact(self) -> Prediction:
        """The same prediction with only the RANK_CAP highest scores kept (every Δ equal: module doc)."""
        def top(x: torch.Tensor) -> torch.Tensor:
            return x.topk(min(RANK_CAP, x.shape[1]), dim=1).values if x.shape[1] > RANK_CAP else x
        return Prediction(self.h, self.log_z, self.sum_sq, top(self.scores), self.marginals, self.head_log_z,
                          [top(s) for s in self.head_scores])

    def row(self, i: int) -> Prediction:
        """Row i alone (copies: a kept row must not keep its whole batch alive)."""
        return Prediction(self.h[i:i + 1].clone(), self.log_z[i:i + 1].clone(), self.sum_sq[i:i + 1].clone(),
                          self.scores[i:i + 1].clone(), {f: m[i:i + 1].clone() for f, m in self.marginals.items()},
                          [z[i:i + 1].clone() for z in self.head_log_z],
                          [s[i:i + 1].clone() for s in self.head_scores])

    def pack(self) -> torch.Tensor:
        """(N, S) float64: log Z, Σp², the scores, the marginals (fields in order), each head's log Z and
        scores, side by side (what a serving state stores; `unpack` reads it back with the widths)."""
        parts = [self.log_z[:, None], self.sum_sq[:, None], self.scores,
                 *(self.marginals[f] for f in sorted(self.marginals)), *(z[:, None] for z in self.head_log_z),
                 *self.head_scores]
        return torch.cat([x.to(torch.float64) for x in parts], 1)

    @classmethod
    def unpack(cls, packed: torch.Tensor, h: torch.Tensor, widths: PackedWidths) -> Prediction:
        """`pack`'s (N, S) rows and the states h (N, D) -> the Prediction; ValueError when S does not match."""
        if packed.shape[1] != widths.total:
            raise ValueError(f"a packed prediction of {packed.shape[1]} values, this model's has {widths.total}")
        cols = packed.split([1, 1, widths.scores, *widths.marginals.values(), *[1] * len(widths.heads),
                             *widths.heads], dim=1)
        nm, nh = len(widths.marginals), len(widths.heads)
        return cls(h.to(torch.float64), cols[0][:, 0], cols[1][:, 0], cols[2], dict(zip(widths.marginals,
                   cols[3:3 + nm])), [z[:, 0] for z in cols[3 + nm:3 + nm + nh]], list(cols[3 + nm + nh:]))

    @property
    def nbytes(self) -> int:
        tensors = [self.h, self.log_z, self.sum_sq, self.scores, *self.marginals.values(), *self.head_log_z,
                   *self.head_scores]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class PackedWidths:
    """The column widths of a compact `Prediction.pack` for a model: scores, {field: C_f}, [head scores]."""

    scores: int
    marginals: dict[int, int]
    heads: list[int]

    @classmethod
    def of(cls, v: int, marginals: dict[int, int], head_sizes: list[int]) -> PackedWidths:
        return cls(min(RANK_CAP, v), dict(sorted(marginals.items())), [min(RANK_CAP, c - 1) for c in head_sizes])

    @property
    def total(self) -> int:
        return 2 + self.scores + sum(self.marginals.values()) + len(self.heads) + sum(self.heads)


def predict(h: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor,
            onehots: dict[int, torch.Tensor] | None = None, heads: Heads | None = None) -> Prediction:
    """h (N, D) float32 states, weight_t (D, V) and bias (V,) of the output layer over the regular tokens
    (float64: `DeviationVocab.weight_t`, `.bias`), {token field: `field_onehot` (V, C)} of the fields whose
    marginals are kept, the field heads -> the full Prediction (every logit kept), computed in float64 from
    the float32 h."""
    h64 = h.detach().to(torch.float64)
    logits = torch.addmm(bias, h64, weight_t)
    log_z = torch.logsumexp(logits, dim=1)
    p = torch.exp(logits - log_z.unsqueeze(1))
    marginals = {f: field_marginal(p, onehot.to(p.dtype)) for f, onehot in (onehots or {}).items()}
    head_log_z, head_scores = [], []
    if heads is not None and heads.each:
        for x in torch.addmm(heads.bias, h64, heads.weight_t).split(heads.sizes, dim=1):
            head_log_z.append(torch.logsumexp(x, dim=1))
            head_scores.append(x[:, 1:])  # code 0 (the field's UNK) is never a candidate
    return Prediction(h64, log_z, torch.linalg.vector_norm(p, dim=1).square(), logits, marginals, head_log_z,
                      head_scores)


def observed_probability(pred: Prediction, weight: torch.Tensor, bias: torch.Tensor, obs: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the observed logit, P(obs) = exp(l_obs − log Z), NaN where obs is UNK), both (N,) float64."""
    logit = logit_at(pred.h, weight, bias, obs)
    return logit, torch.where(obs >= 0, torch.exp(logit - pred.log_z), NAN)


def deviation_features(pred: Prediction, weight: torch.Tensor, bias: torch.Tensor, obs: torch.Tensor,
                       obs_codes: torch.Tensor, members: list[tuple[torch.Tensor, torch.Tensor]],
                       field_names: list[str], ordered: set[int] | frozenset[int] = frozenset(),
                       observed: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """All Δ at N positions at once, the batch and the one-event form alike (N = 1), from a full or a
    compact prediction (the same values: module doc).

    weight (V, D) and bias (V,) the regular tokens' output layer (float64), obs (N,) observed index (-1 =
    UNK), obs_codes (N, Ft) the observed event's codes of the token fields, members[f] the `field_members`
    tables of token field f (read for the fields without a kept marginal), `ordered` the token fields (with
    a kept marginal) that also get `tail_<name>` = `upper_tail_surprisal`; `observed`: `observed_probability`
    when the caller has it already.
    Returns {name: (N,) float32}, rounded once from float64 (see the module doc).
    """
    logit, p_obs = observed if observed is not None else observed_probability(pred, weight, bias, obs)
    known = obs >= 0
    rank = torch.where(known, rank_above(pred.scores, logit), NAN)
    out = {
        "surprisal": torch.where(known, _neg_log(p_obs, 1e-38), p_obs),
        "rank": rank,
        "log_rank": torch.log(rank),
        "delta_std": standardised_deviation(p_obs, pred.sum_sq, weight.shape[0]),
        "entropy2": collision_entropy(pred.sum_sq),
        "emb_distance": embedding_distance(pred.h, weight, obs),
        "is_unk": (~known).to(logit.dtype),
    }
    for f, name in enumerate(field_names):
        code = obs_codes[:, f]
        mass = (marginal_mass(pred.marginals[f], code) if f in pred.marginals
                else member_mass(pred.h, pred.log_z, weight, bias, code, members[f]))
        out[f"surprisal_{name}"] = mass_surprisal(mass)
    for f in sorted(ordered):
        out[f"tail_{field_names[f]}"] = upper_tail_surprisal(pred.marginals[f], obs_codes[:, f])
    return as_float32(out)


def as_float32(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: (N,) float64} -> the same rounded to float32, in one cast (a score reads ~30 of them)."""
    if not values:
        return {}
    return dict(zip(values, torch.stack(list(values.values())).to(torch.float32).unbind(0)))


def head_features(pred: Prediction, heads: Heads, all_codes: torch.Tensor, names: list[str]
                  ) -> dict[str, torch.Tensor]:
    """`head_surprisal_<field>` (−log P_head(field = observed code)) and `head_rank_<field>` (1 + the codes
    >= 1 the head scored higher, capped as the token rank) of every field with a head at N positions:
    all_codes (N, F) the observed event's codes of all fields, names the F field names -> {name: (N,)
    float32}, NaN for code 0 (the field's UNK); empty without field heads."""
    if not heads.each:
        return {}
    n_heads = len(heads.each)
    ok, row = heads.rows(all_codes[:, :n_heads])
    logit = (pred.h.unsqueeze(1) * heads.weight[row]).sum(2) + heads.bias[row]  # (N, H), as logit_at
    surprisal = torch.where(ok, _neg_log(torch.exp(logit - torch.stack(pred.head_log_z, 1)), 1e-38), NAN)
    seg = heads.segment([s.shape[1] for s in pred.head_scores])
    rank = torch.where(ok, rank_above(torch.cat(pred.head_scores, 1), logit, seg), NAN)
    return as_float32({f"head_{kind}_{names[f]}": x[:, f] for f in range(n_heads)
                    for kind, x in (("surprisal", surprisal), ("rank", rank))})


DELTA_NAMES = ("surprisal", "rank", "log_rank", "delta_std", "entropy2", "emb_distance", "is_unk")
