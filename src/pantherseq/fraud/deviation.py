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
    head_stats + deviation_from_stats          all of them for one position in NumPy (the service's path:
                                               the stats are cached per prediction); deviation_one = both

Per-field surprisal. Our models have no per-field output heads: the only prediction is over tokens, each
token a combination of field values (`tokenizer.token_codes`). The probability of a field value is the sum
of the probabilities of the tokens carrying it (`field_members` lists them per value); an event's own field code is
known even when its token is UNK (`sequences/codes.npy`), so per-field surprisal is defined for UNK events
too. A value no vocabulary token carries (or the field's own UNK code 0) has no predicted mass: the
surprisal is then NaN rather than a made-up floor; masses are clamped at 1e-12 before the log otherwise.

UNK observed events. Their token-level features (surprisal, rank, Δ, distance) are NaN, the flag `is_unk`
is 1, and the per-field surprisals still say whether the amount and the merchant were expected. LightGBM
treats NaN as missing and learns its own branch for it. The predicted vector for the distance is the
model's hidden state h_t (logit_v = h_t · w_v + b_v, so h_t is the direction the model expects).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MASS_FLOOR = 1e-12


def _nan(n: int, device=None) -> torch.Tensor:
    return torch.full((n,), float("nan"), device=device)


def _gather(x: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """x (N, V), obs (N,) with -1 = none -> (N,) x[i, obs[i]], NaN where obs < 0."""
    ok = obs >= 0
    out = x.gather(1, obs.clamp_min(0).unsqueeze(1)).squeeze(1).float()
    return torch.where(ok, out, _nan(len(obs), x.device))


def surprisal(p: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """p (N, V) probabilities -> (N,) −log P(obs) (P clamped at 1e-38, the float32 floor: at most 87.5)."""
    return -torch.log(_gather(p, obs).clamp_min(1e-38))


def rank_of(logits: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """logits (N, V) -> (N,) 1-based rank of obs: 1 + #tokens with a strictly higher score."""
    t = logits.gather(1, obs.clamp_min(0).unsqueeze(1))
    r = 1.0 + torch.gt(logits, t).sum(1, dtype=torch.int32).float()
    return torch.where(obs >= 0, r, _nan(len(obs), logits.device))


def _sum_sq(p: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(p, dim=1).square()


def standardised_deviation(p: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """p (N, V) probabilities (rows sum to 1) -> (N,) (p_obs − μ) / σ, μ = 1/V, σ the population std
    sqrt(Σp²/V − μ²), computed from Σp² in one pass (floored at 1e-12)."""
    v = p.shape[1]
    mu = 1.0 / v
    sd = (_sum_sq(p) / v - mu * mu).clamp_min(0).sqrt().clamp_min(1e-12)
    return (_gather(p, obs) - mu) / sd


def collision_entropy(p: torch.Tensor) -> torch.Tensor:
    """(N,) Rényi-2 entropy −log Σ p²: how spread the prediction is (0 when certain, log V when uniform).
    Used instead of the Shannon entropy because it comes from the same pass as σ."""
    return -torch.log(_sum_sq(p).clamp_min(1e-38))


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
    mass = (p.gather(1, ids[c]) * valid[c]).sum(1).float()  # (N, K) -> (N,)
    return torch.where(ok, mass, torch.zeros_like(mass))


def field_surprisal(p: torch.Tensor, obs_code: torch.Tensor, members: tuple[torch.Tensor, torch.Tensor]
                    ) -> torch.Tensor:
    """(N,) −log P(field = obs_code) with the token distribution marginalised; NaN when no token carries
    the value (or it is the field's UNK)."""
    mass = field_mass(p, obs_code, members)
    out = -torch.log(mass.clamp_min(MASS_FLOOR))
    return torch.where(mass > 0, out, _nan(len(mass), p.device))


def field_marginal(p: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """p (N, V), onehot (V, C) float (token -> its field code) -> (N, C) P(field = c) for every code c."""
    return p @ onehot


def upper_tail_surprisal(marginal: torch.Tensor, obs_code: torch.Tensor) -> torch.Tensor:
    """For an ordered field (numeric buckets, codes 1..C-1 increasing): −log P(field >= observed code), the
    one-sided surprise of a value this *high* (an amount spike), where plain surprisal is two-sided.
    marginal (N, C), obs_code (N,) -> (N,); NaN for code 0 (the field's UNK)."""
    tail = marginal.flip(1).cumsum(1).flip(1)  # (N, C): P(field >= c)
    c = obs_code.clamp(0, marginal.shape[1] - 1)
    val = tail.gather(1, c.unsqueeze(1)).squeeze(1).float()
    out = -torch.log(val.clamp_min(MASS_FLOOR))
    return torch.where(obs_code > 0, out, _nan(len(obs_code), marginal.device))


def field_onehot(token_codes: np.ndarray, size: int) -> torch.Tensor:
    """(V, size) float32: row v is the one-hot code of token v for the field."""
    out = torch.zeros(len(token_codes), size)
    out[torch.arange(len(token_codes)), torch.from_numpy(np.asarray(token_codes, dtype=np.int64))] = 1.0
    return out


def embedding_distance(pred: torch.Tensor, weight: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """pred (N, D) predicted vectors, weight (V, D) token embeddings -> (N,) 1 − cos(pred, weight[obs])."""
    w = weight[obs.clamp_min(0)]
    cos = torch.nn.functional.cosine_similarity(pred.float(), w.float(), dim=1, eps=1e-12)
    return torch.where(obs >= 0, 1.0 - cos, _nan(len(obs), pred.device))


def expected_embedding(p: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The probability-weighted output embedding Σ_v p_v w_v: (N, V) x (V, D) -> (N, D)."""
    return p @ weight


DELTA_NAMES = ("surprisal", "rank", "log_rank", "delta_std", "entropy2", "emb_distance", "is_unk")


def deviation_features(logits: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, obs: torch.Tensor,
                       obs_codes: torch.Tensor, members: list[tuple[torch.Tensor, torch.Tensor]],
                       field_names: list[str], ordered: dict[int, torch.Tensor] | None = None
                       ) -> dict[str, torch.Tensor]:
    """All Δ at N positions at once.

    logits (N, V) over the regular tokens, h (N, D) hidden states, weight (V, D) their output embeddings,
    obs (N,) observed index (-1 = UNK), obs_codes (N, Ft) the observed event's codes of the token fields,
    members[f] the `field_members` tables of token field f; `ordered` {f: `field_onehot` (V, C)} for the
    ordered (numeric) token fields, which also get `tail_<name>` = `upper_tail_surprisal`.
    Returns {name: (N,) float32}.
    """
    p = torch.softmax(logits.float(), dim=1)
    rank = rank_of(logits, obs)
    out = {
        "surprisal": surprisal(p, obs),
        "rank": rank,
        "log_rank": torch.log(rank),
        "delta_std": standardised_deviation(p, obs),
        "entropy2": collision_entropy(p),
        "emb_distance": embedding_distance(h, weight, obs),
        "is_unk": (obs < 0).float(),
    }
    for f, name in enumerate(field_names):
        out[f"surprisal_{name}"] = field_surprisal(p, obs_codes[:, f], members[f])
    for f, onehot in (ordered or {}).items():
        out[f"tail_{field_names[f]}"] = upper_tail_surprisal(field_marginal(p, onehot), obs_codes[:, f])
    return out


@dataclass
class HeadStats:
    """What the Δ of any next event need from one prediction (one position's logits over V), computed once
    per prediction: the service caches it per user, so scoring an event costs O(V) comparisons for the rank
    and O(members) for the per-field masses instead of a V × D product and several passes over V."""

    logits: np.ndarray  # (V,) float32
    log_z: float  # log Σ exp(logits)
    sum_sq: float  # Σ p²
    marginals: dict[int, np.ndarray]  # ordered field f -> (C,) P(field = c)
    tails: dict[int, np.ndarray]  # ordered field f -> (C,) P(field >= c)


def head_stats(logits: np.ndarray, ordered: dict[int, np.ndarray] | None = None,
               sizes: dict[int, int] | None = None) -> HeadStats:
    """logits (V,) of one position; ordered {f: (V,) token codes} of the ordered fields (sizes {f: C})."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    m = np.float32(logits.max())
    e = np.exp(logits - m)
    z = e.sum(dtype=np.float32)
    p = e / z
    marginals, tails = {}, {}
    for f, codes in (ordered or {}).items():
        size = (sizes or {}).get(f, int(codes.max()) + 1)
        marg = np.bincount(codes, weights=p, minlength=size).astype(np.float32)
        marginals[f], tails[f] = marg, marg[::-1].cumsum()[::-1].astype(np.float32)
    return HeadStats(logits, float(m) + float(np.log(z)), float(np.dot(p, p)), marginals, tails)


def deviation_from_stats(st: HeadStats, h: np.ndarray, weight: np.ndarray, obs: int, obs_codes: list[int],
                         members: list[list[np.ndarray]], field_names: list[str]) -> dict[str, float]:
    """`deviation_features` for ONE position from its `HeadStats` (the service's request path). h (D,),
    weight (V, D), obs the observed index (-1 = UNK), obs_codes the token fields' codes, members[f][c] the
    token indices carrying code c of field f. Same formulas and floors as the batched version (tested)."""
    logits, v, nan = st.logits, len(st.logits), float("nan")
    out: dict[str, float] = {"entropy2": -float(np.log(max(st.sum_sq, 1e-38)))}
    if obs >= 0:
        p_obs = float(np.exp(np.float32(logits[obs]) - st.log_z))
        rank = 1.0 + float(np.count_nonzero(logits > logits[obs]))
        sd = max(float(np.sqrt(max(st.sum_sq / v - 1.0 / v / v, 0.0))), 1e-12)
        w = weight[obs].astype(np.float32)
        cos = float(np.dot(h, w)) / max(float(np.linalg.norm(h)) * float(np.linalg.norm(w)), 1e-12)
        out |= {"surprisal": -float(np.log(max(p_obs, 1e-38))), "rank": rank, "log_rank": float(np.log(rank)),
                "delta_std": (p_obs - 1.0 / v) / sd, "emb_distance": 1.0 - cos}
    else:
        out |= {"surprisal": nan, "rank": nan, "log_rank": nan, "delta_std": nan, "emb_distance": nan}
    out["is_unk"] = float(obs < 0)
    for f, name in enumerate(field_names):
        c = int(obs_codes[f])
        if not 0 < c < len(members[f]):
            mass = 0.0
        elif f in st.marginals:
            mass = float(st.marginals[f][c])
        else:
            mass = float(np.exp(logits[members[f][c]] - np.float32(st.log_z)).sum(dtype=np.float32))
        out[f"surprisal_{name}"] = -float(np.log(max(mass, MASS_FLOOR))) if mass > 0 else nan
    for f in st.tails:
        c = int(obs_codes[f])
        tail = float(st.tails[f][c]) if 0 < c < len(st.tails[f]) else 0.0
        out[f"tail_{field_names[f]}"] = -float(np.log(max(tail, MASS_FLOOR))) if c > 0 else nan
    return {k: out[k] for k in (*DELTA_NAMES, *(k for k in out if k not in DELTA_NAMES))}


def deviation_one(logits: np.ndarray, h: np.ndarray, weight: np.ndarray, obs: int, obs_codes: list[int],
                  members: list[list[np.ndarray]], field_names: list[str],
                  ordered: dict[int, np.ndarray] | None = None) -> dict[str, float]:
    """`deviation_features` for ONE position in NumPy: `head_stats` then `deviation_from_stats`."""
    sizes = {f: len(members[f]) for f in (ordered or {})}
    return deviation_from_stats(head_stats(logits, ordered, sizes), h, weight, obs, obs_codes, members,
                                field_names)
