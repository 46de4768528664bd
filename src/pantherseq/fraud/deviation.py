"""Deviation features Δ (SPEC §7, paper §3.1 Stage 2 and §4.1): how far an observed transaction is from the
behaviour the generative model predicted for its user, given the user's history strictly before it.

Every function takes the model's prediction at N positions over the V regular tokens (the special ids
PAD/UNK/BOS/PROFILE are never candidates: a model trained with UNK targets excluded gives the UNK logit no
meaning) and the observed token's index among them, `obs` (N,) int64, with -1 where the observed event is
UNK (outside the vocabulary). Each returns (N,) float32, NaN where it is undefined.

    surprisal(p, obs)                          −log P(x_new | history)
    rank_of(logits, obs)                       1 + the number of tokens scored strictly higher
    standardised_deviation(p, obs)             the paper's Δ = (P_u(x_new) − μ_u) / σ_u, μ_u and σ_u the mean
                                               and (population) std of the predicted probabilities over the
                                               V tokens; μ_u = 1/V since they sum to one
    collision_entropy(p)                       −log Σ p², how spread the prediction was (one pass with σ)
    field_surprisal(p, obs_code, members)      −log P(field = observed value): the token distribution
                                               marginalised over the tokens sharing the observed value
    upper_tail_surprisal(marginal, obs_code)   −log P(field >= observed bucket) for numeric fields: the
                                               one-sided surprise of an amount this high
    embedding_distance(pred, weight, obs)      1 − cos(predicted vector, observed token's output embedding)
    head_log_probs(h, stack_heads(heads))      the per-field heads' log P(next field f = c), float64
    head_surprisal(logp, obs_code)             −log P_head(field = observed code), from the field's own head
    head_rank(logp, obs_code)                  1 + the number of codes the head scored strictly higher
    predict(h, weight, bias) -> Prediction     the prediction at N positions: h, P over V and the per-
                                               prediction sums (Σp², ordered fields' marginals, the field
                                               heads' log-probabilities), float64
    deviation_features(pred, obs, ...)         all of them at once, (N,) float32 each

One implementation for the batch and for one event. `pantherseq fraud` calls `deviation_features` on chunks
of positions, the service on one (its `Prediction` is cached per user by the refresh, so a request costs a
few passes over V and no V × D product). Everything is computed in float64 from the float32 state h and
rounded to float32 once, at the end: the two paths run the same formulas on differently shaped tensors,
whose kernels may sum in other orders; in float64 those differences are ~1e-16 relative and vanish in the
final rounding (two results can round apart only when one lies within ~1e-16 of a float32 rounding
boundary: ~1e-9 per value), so the risk model sees the same features online as offline, on any CPU.

Per-field surprisal, marginalised. Every model predicts tokens, each token a combination of the token
fields' values (`tokenizer.token_codes`). The probability of a field value is the sum
of the probabilities of the tokens carrying it (`field_members` lists them per value); an event's own field code is
known even when its token is UNK (`sequences/codes.npy`), so per-field surprisal is defined for UNK events
too. A value no vocabulary token carries (or the field's own UNK code 0) has no predicted mass: the
surprisal is then NaN rather than a made-up floor; masses are clamped at 1e-12 before the log otherwise.

Per-field surprisal and rank from the field heads. A model with `field_heads` (model/heads.py) also predicts
the next event's code of EVERY field (token fields and the others: merchant, hour, weekday...) with a head
of its own, trained on UNK events too; `head_surprisal` / `head_rank` read those heads from the same h, in
float64. Code 0 (the field's UNK) is never a target and never a candidate: its surprisal and rank are NaN.

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


def _nan(n: int, like: torch.Tensor | None = None) -> torch.Tensor:
    dtype = like.dtype if like is not None and like.is_floating_point() else torch.float32
    return torch.full((n,), float("nan"), dtype=dtype)


def _neg_log(mass: torch.Tensor, floor: float) -> torch.Tensor:
    """−log of probability masses, each rounded to float32 first. A mass that is 1 up to the float64 error
    (a certain prediction, the lowest bucket's upper tail) would give ±1e-16, whose sign depends on the
    summation order; rounded, it is exactly 1 and the surprisal exactly 0 on every path."""
    return -torch.log(mass.clamp_min(floor).to(torch.float32).to(mass.dtype))


def _gather(x: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """x (N, V), obs (N,) with -1 = none -> (N,) x[i, obs[i]], NaN where obs < 0 (x's dtype)."""
    ok = obs >= 0
    out = x.gather(1, obs.clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.where(ok, out, _nan(len(obs), x))


def surprisal(p: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """p (N, V) probabilities -> (N,) −log P(obs) (P clamped at 1e-38, the float32 floor: at most 87.5)."""
    return _neg_log(_gather(p, obs), 1e-38)


def rank_of(logits: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """logits (N, V) -> (N,) 1-based rank of obs: 1 + #tokens with a strictly higher score."""
    t = logits.gather(1, obs.clamp_min(0).unsqueeze(1))
    r = 1.0 + torch.gt(logits, t).sum(1, dtype=torch.int64).to(logits.dtype)
    return torch.where(obs >= 0, r, _nan(len(obs), logits))


def _sum_sq(p: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(p, dim=1).square()


def standardised_deviation(p: torch.Tensor, obs: torch.Tensor, sum_sq: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """p (N, V) probabilities (rows sum to 1) -> (N,) (p_obs − μ) / σ, μ = 1/V, σ the population std
    sqrt(Σp²/V − μ²), computed from Σp² (`sum_sq`, one pass over V when not given; floored at 1e-12)."""
    v = p.shape[1]
    mu = 1.0 / v
    sum_sq = _sum_sq(p) if sum_sq is None else sum_sq
    sd = (sum_sq / v - mu * mu).clamp_min(0).sqrt().clamp_min(1e-12)
    return (_gather(p, obs) - mu) / sd


def collision_entropy(p: torch.Tensor, sum_sq: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) Rényi-2 entropy −log Σ p²: how spread the prediction is (0 when certain, log V when uniform).
    Used instead of the Shannon entropy because it comes from the same pass as σ."""
    return _neg_log(_sum_sq(p) if sum_sq is None else sum_sq, 1e-38)


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


def field_mass(p: torch.Tensor, obs_code: torch.Tensor, members: tuple[torch.Tensor, torch.Tensor]
               ) -> torch.Tensor:
    """p (N, V), obs_code (N,) field codes, members from `field_members` -> (N,) Σ p over the tokens whose
    field code equals obs_code (0 for code 0 = the field's UNK, or a code outside the table)."""
    ids, valid = members
    ok = (obs_code > 0) & (obs_code < ids.shape[0])
    c = obs_code.clamp(0, ids.shape[0] - 1)
    mass = (p.gather(1, ids[c]) * valid[c]).sum(1)  # (N, K) -> (N,)
    return torch.where(ok, mass, torch.zeros_like(mass))


def field_surprisal(p: torch.Tensor, obs_code: torch.Tensor, members: tuple[torch.Tensor, torch.Tensor]
                    ) -> torch.Tensor:
    """(N,) −log P(field = obs_code) with the token distribution marginalised; NaN when no token carries
    the value (or it is the field's UNK)."""
    mass = field_mass(p, obs_code, members)
    out = _neg_log(mass, MASS_FLOOR)
    return torch.where(mass > 0, out, _nan(len(mass), p))


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
    return torch.where(obs_code > 0, out, _nan(len(obs_code), marginal))


def field_onehot(token_codes: np.ndarray, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(V, size): row v is the one-hot code of token v for the field."""
    out = torch.zeros(len(token_codes), size, dtype=dtype)
    out[torch.arange(len(token_codes)), torch.from_numpy(np.asarray(token_codes, dtype=np.int64))] = 1.0
    return out


def embedding_distance(pred: torch.Tensor, weight: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """pred (N, D) predicted vectors, weight (V, D) token embeddings -> (N,) 1 − cos(pred, weight[obs])."""
    w = weight[obs.clamp_min(0)].to(pred.dtype)
    cos = torch.nn.functional.cosine_similarity(pred, w, dim=1, eps=1e-12)
    return torch.where(obs >= 0, 1.0 - cos, _nan(len(obs), pred))


def expected_embedding(p: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The probability-weighted output embedding Σ_v p_v w_v: (N, V) x (V, D) -> (N, D)."""
    return p @ weight


def stack_heads(heads: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """[(W (C_f, D), b (C_f,))] -> (W^T (D, ΣC) float64, b (ΣC,) float64, [C_f]): one product for every head."""
    if not heads:
        return torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), []
    w = torch.cat([w for w, _ in heads]).to(torch.float64)
    return w.t().contiguous(), torch.cat([b for _, b in heads]).to(torch.float64), [len(b) for _, b in heads]


def head_log_probs(h: torch.Tensor, heads: tuple[torch.Tensor, torch.Tensor, list[int]] | None
                   ) -> list[torch.Tensor]:
    """h (N, D) float64, heads from `stack_heads` -> [(N, C_f) log-softmax of h W_f^T + b_f] per field."""
    if not heads or not heads[2]:
        return []
    logits = torch.addmm(heads[1], h, heads[0])  # (N, ΣC)
    return [torch.log_softmax(x, dim=1) for x in logits.split(heads[2], dim=1)]


def _code_ok(logp: torch.Tensor, obs_code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ok = (obs_code > 0) & (obs_code < logp.shape[1])
    return ok, obs_code.clamp(0, logp.shape[1] - 1)


def head_surprisal(logp: torch.Tensor, obs_code: torch.Tensor) -> torch.Tensor:
    """logp (N, C) a field head's log-probabilities, obs_code (N,) -> (N,) −log P(field = obs_code), the mass
    rounded to float32 before the log as every surprisal here; NaN for code 0 (the field's UNK)."""
    ok, c = _code_ok(logp, obs_code)
    mass = logp.gather(1, c.unsqueeze(1)).squeeze(1).exp()
    return torch.where(ok, _neg_log(mass, 1e-38), _nan(len(c), logp))


def head_rank(logp: torch.Tensor, obs_code: torch.Tensor) -> torch.Tensor:
    """(N,) 1 + the number of codes >= 1 the head scored strictly higher than obs_code; NaN for code 0."""
    ok, c = _code_ok(logp, obs_code)
    t = logp.gather(1, c.unsqueeze(1))
    r = 1.0 + torch.gt(logp[:, 1:], t).sum(1, dtype=torch.int64).to(logp.dtype)
    return torch.where(ok, r, _nan(len(c), logp))


DELTA_NAMES = ("surprisal", "rank", "log_rank", "delta_std", "entropy2", "emb_distance", "is_unk")


@dataclass
class Prediction:
    """The model's prediction at N positions, float64, and what every Δ of the next event needs from it that
    does not depend on that event — computed once per prediction (the service caches one per user, about
    8 V bytes, so a request pays no pass over V for these):

        h (N, D) states, p (N, V) P over the regular tokens, sum_sq (N,) Σp²,
        marginals {ordered field f: (N, C) P(field = c)}, field_logp [(N, C_f)] the field heads' log P of
        every field (empty without field heads)
    """

    h: torch.Tensor
    p: torch.Tensor
    sum_sq: torch.Tensor
    marginals: dict[int, torch.Tensor]
    field_logp: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def of(cls, h: torch.Tensor, p: torch.Tensor, ordered: dict[int, torch.Tensor] | None = None) -> Prediction:
        """From states h (N, D) and probabilities p (N, V); `ordered` {f: `field_onehot` (V, C)}."""
        return cls(h, p, _sum_sq(p), {f: field_marginal(p, onehot.to(p.dtype)) for f, onehot in (ordered or {}).items()})

    def row(self, i: int) -> Prediction:
        """Row i alone (copies: a cached row must not keep its whole batch alive)."""
        return Prediction(self.h[i:i + 1].clone(), self.p[i:i + 1].clone(), self.sum_sq[i:i + 1].clone(),
                          {f: m[i:i + 1].clone() for f, m in self.marginals.items()},
                          [lp[i:i + 1].clone() for lp in self.field_logp])

    @property
    def nbytes(self) -> int:
        tensors = [self.h, self.p, self.sum_sq, *self.marginals.values(), *self.field_logp]
        return sum(t.numel() * t.element_size() for t in tensors)


def predict(h: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor,
            ordered: dict[int, torch.Tensor] | None = None,
            heads: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None) -> Prediction:
    """h (N, D) float32 states, weight_t (D, V) and bias (V,) of the output layer over the regular tokens
    (float64: `DeviationVocab.weight_t`, `.bias`), the ordered fields' one-hot tables, the field heads
    (`stack_heads`) -> Prediction. Everything is computed in float64 from the float32 h."""
    h64 = h.detach().to(torch.float64)
    pred = Prediction.of(h64, torch.softmax(torch.addmm(bias, h64, weight_t), dim=1), ordered)
    pred.field_logp = head_log_probs(h64, heads)
    return pred


def deviation_features(pred: Prediction, weight: torch.Tensor, obs: torch.Tensor, obs_codes: torch.Tensor,
                       members: list[tuple[torch.Tensor, torch.Tensor]], field_names: list[str]
                       ) -> dict[str, torch.Tensor]:
    """All Δ at N positions at once, the batch and the one-event form alike (N = 1).

    pred the `Prediction` at those positions, weight (V, D) the regular tokens' output embeddings (float64),
    obs (N,) observed index (-1 = UNK), obs_codes (N, Ft) the observed event's codes of the token fields,
    members[f] the `field_members` tables of token field f; the ordered (numeric) token fields of
    `pred.marginals` also get `tail_<name>` = `upper_tail_surprisal`.
    Returns {name: (N,) float32}, rounded once from float64 (see the module doc).
    """
    p = pred.p
    rank = rank_of(p, obs)
    out = {
        "surprisal": surprisal(p, obs),
        "rank": rank,
        "log_rank": torch.log(rank),
        "delta_std": standardised_deviation(p, obs, pred.sum_sq),
        "entropy2": collision_entropy(p, pred.sum_sq),
        "emb_distance": embedding_distance(pred.h, weight, obs),
        "is_unk": (obs < 0).to(p.dtype),
    }
    for f, name in enumerate(field_names):
        out[f"surprisal_{name}"] = field_surprisal(p, obs_codes[:, f], members[f])
    for f, marginal in pred.marginals.items():
        out[f"tail_{field_names[f]}"] = upper_tail_surprisal(marginal, obs_codes[:, f])
    return {k: v.to(torch.float32) for k, v in out.items()}


def head_features(pred: Prediction, all_codes: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """`head_surprisal_<field>` and `head_rank_<field>` of every field with a head at N positions:
    all_codes (N, F) the observed event's codes of all fields, names the F field names -> {name: (N,)
    float32} (empty without field heads). One implementation for the batch and the one event."""
    out = {}
    for f, logp in enumerate(pred.field_logp):
        out[f"head_surprisal_{names[f]}"] = head_surprisal(logp, all_codes[:, f]).to(torch.float32)
        out[f"head_rank_{names[f]}"] = head_rank(logp, all_codes[:, f]).to(torch.float32)
    return out
