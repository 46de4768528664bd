"""SPRM prototype analysis (the paper's Fig. 3, SPEC §4): which prototypes recurring behaviour attends to.

    write_prototypes(run, name)          analyse the model trained under RUN/models/NAME -> RUN/prototypes.json
    prototype_analysis(model, data)      the analysis of a loaded model as a dict (what the file holds per model)

The most frequent token 3-grams of the training split (consecutive events of one user, none of them a
special token) are each fed alone through the model as a 3-event window; the analysis keeps the last SPRM
layer's weights over the M prototypes at the 3-gram's last event, averaged over up to PER_GRAM occurrences
(spread over users and time, whose other fields, gaps and profiles differ).

RUN/prototypes.json maps a model's name to its analysis:

    {"panther": {"model": "panther", "n": 3, "per_gram": 32, "n_prototypes": M, "token_fields": [...],
                 "grams": [[id, id, id], ...], "labels": [[label, label, label], ...], "counts": [...],
                 "attention": [[w_1 ... w_M], ...]}}                 (G rows, most frequent first)

or, when the analysis cannot be made (no 3-gram occurs twice), {"panther": {"model": ..., "error": why}}.
`pantherseq pretrain` writes it at the end of training a model with SPRM; the report only draws it.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pantherseq.data.schema import N_SPECIAL
from pantherseq.errors import ConfigError
from pantherseq.run import RunDir, read_json

log = logging.getLogger(__name__)

TOP_GRAMS = 12  # 3-grams analysed
PER_GRAM = 32  # occurrences averaged per 3-gram
N = 3  # events per n-gram


def frequent_ngrams(tokens: np.ndarray, offsets: np.ndarray, keep: np.ndarray, n: int = N, top: int = TOP_GRAMS,
                    min_count: int = 2) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The `top` most frequent n-grams (seen at least `min_count` times) of consecutive events of one user, all
    of them `keep` (e.g. training split and not UNK): (G, n) token ids, (G,) counts, each one's start rows."""
    tokens = np.asarray(tokens, dtype=np.int64)
    starts, codes = _gram_codes(tokens, offsets, keep, n, int(tokens.max(initial=0)) + 1)
    if not len(starts):
        return np.zeros((0, n), np.int64), np.zeros(0, np.int64), []
    _, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:top]
    order = order[counts[order] >= min_count]
    if not len(order):
        return np.zeros((0, n), np.int64), np.zeros(0, np.int64), []
    occurrences = [starts[inverse == g] for g in order]
    grams = np.stack([tokens[occ[0] + np.arange(n)] for occ in occurrences])
    return grams, counts[order], occurrences


def _gram_codes(tokens: np.ndarray, offsets: np.ndarray, keep: np.ndarray, n: int, vocab: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Start rows of the n-grams of `frequent_ngrams` and each one's code (its tokens in base `vocab`)."""
    user = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    starts = np.arange(max(len(tokens) - n + 1, 0))
    ok = user[starts] == user[starts + n - 1]
    for j in range(n):
        ok &= keep[starts + j]
    starts = starts[ok]
    return starts, np.ravel_multi_index(tuple(tokens[starts + j] for j in range(n)), (vocab,) * n)


def sharded_ngrams(data, train: int, n: int = N, top: int = TOP_GRAMS, min_count: int = 2
                   ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """`frequent_ngrams` of a sharded run's training split, shard by shard (counts summed over the shards;
    start rows into the shards laid end to end, `RunData.shard_starts`)."""
    vocab = data.tokenizer.vocab_size

    def grams_of(i: int) -> tuple[np.ndarray, np.ndarray]:
        part, _, _ = data.shard(i)
        tokens = np.asarray(part.tokens, dtype=np.int64)
        keep = (np.asarray(part.split) == train) & (tokens >= N_SPECIAL)
        return _gram_codes(tokens, np.asarray(part.offsets), keep, n, vocab)

    seen, tallies = [], []
    for i in range(data.shards):
        u, c = np.unique(grams_of(i)[1], return_counts=True)
        seen.append(u)
        tallies.append(c)
    codes, inverse = np.unique(np.concatenate(seen), return_inverse=True)
    counts = np.bincount(inverse, weights=np.concatenate(tallies), minlength=len(codes)).astype(np.int64)
    order = np.argsort(-counts, kind="stable")[:top]
    order = order[counts[order] >= min_count]
    if not len(order):
        return np.zeros((0, n), np.int64), np.zeros(0, np.int64), []
    found: list[list[np.ndarray]] = [[] for _ in order]
    for i in range(data.shards):
        starts, c = grams_of(i)
        for k, g in enumerate(codes[order].tolist()):
            found[k].append(starts[c == g] + data.shard_starts[i])
    grams = np.stack(np.unravel_index(codes[order], (vocab,) * n), axis=1).astype(np.int64)
    return grams, counts[order], [np.concatenate(f) for f in found]


def has_sprm(model: Any) -> bool:
    """Whether the model has SPRM layers whose prototype weights can be analysed."""
    return callable(getattr(model, "prototype_attention", None)) and bool(getattr(model.cfg, "sprm", False))


def ngram_attention(model, data, occurrences: list[np.ndarray], n: int = N, per_gram: int = PER_GRAM
                    ) -> np.ndarray:
    """(G, M): mean prototype weights of the last SPRM layer at the last event of each n-gram fed alone
    (the model in eval mode; its mode is restored)."""
    import torch

    picked = [occ[np.unique(np.linspace(0, len(occ) - 1, min(per_gram, len(occ))).astype(int))]
              for occ in occurrences]  # spread over the occurrences (users, time)
    starts = np.concatenate(picked)
    windows = np.stack([starts, np.full(len(starts), n), starts + 1], axis=1)  # [start, length, first target]
    # a sharded run's batch is cut per shard (RunData.eval_batches): feed the windows in row order
    order = np.argsort(starts, kind="stable") if data.shards > 1 else np.arange(len(starts))
    windows = windows[order]
    was_training = model.training
    model.eval()
    parts = []
    try:
        with torch.no_grad():
            for batch in data.eval_batches(windows, len(windows)):
                model.hidden(batch)
                att = model.prototype_attention()  # (B, n, M)
                if att is None:
                    raise ConfigError("the model has no SPRM (sprm = false): no prototype attention to analyse")
                parts.append(att[:, n - 1].numpy())
    finally:
        model.train(was_training)
    last = np.empty((len(order), parts[0].shape[1]), parts[0].dtype)
    last[order] = np.concatenate(parts)  # (B, M) in the windows' order
    bounds = np.cumsum([0, *map(len, picked)])
    return np.stack([last[a:b].mean(0) for a, b in itertools.pairwise(bounds)])


def prototype_analysis(model, data, name: str) -> dict[str, Any]:
    """The analysis of the module docstring for a loaded model and its run's `RunData`."""
    from pantherseq.data.split import SPLIT_NAMES

    train = SPLIT_NAMES.index("train")
    if data.shards > 1:  # shard by shard, never merged
        grams, counts, occurrences = sharded_ngrams(data, train)
    else:
        seq = data.seq
        keep = (np.asarray(seq.split) == train) & (np.asarray(seq.tokens) >= N_SPECIAL)
        grams, counts, occurrences = frequent_ngrams(seq.tokens, seq.offsets, keep)
    if not len(grams):
        raise ConfigError("no token 3-gram occurs twice in the training split (too fine a vocabulary)")
    att = ngram_attention(model, data, occurrences)  # (G, M)
    label = data.tokenizer.token_label
    return {"model": name, "n": N, "per_gram": PER_GRAM, "n_prototypes": int(att.shape[1]),
            "token_fields": list(data.tokenizer.token_fields), "grams": grams.tolist(),
            "labels": [[label(int(t)) for t in g] for g in grams], "counts": [int(c) for c in counts],
            "attention": att.tolist()}


def _merge(run: RunDir, name: str, entry: dict[str, Any] | None) -> None:
    """Set (or, with None, remove) `name`'s entry of RUN/prototypes.json."""
    merged = read_json(run.prototypes) or {}
    if entry is None and name not in merged:
        return
    if entry is None:
        merged.pop(name)
    else:
        merged[name] = entry
    tmp = run.prototypes.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    tmp.replace(run.prototypes)


def write_prototypes(run_dir: RunDir | str | Path, name: str, model=None, data=None) -> dict[str, Any] | None:
    """Analyse the model trained under RUN/models/NAME (or `model`, already loaded, with its run's `data`)
    and merge the result into RUN/prototypes.json. A model without SPRM has no analysis: its stale entry,
    if any, is removed and None returned. An analysis that cannot be made is written as its error."""
    run = RunDir.of(run_dir).require()
    if model is None:
        from pantherseq.train.checkpoint import load_model

        model, _ = load_model(run.path, name)
    if not has_sprm(model):
        _merge(run, name, None)
        return None
    if data is None:
        from pantherseq.data.dataset import RunData

        data = RunData(run.path)
    try:
        entry = prototype_analysis(model, data, name)
    except ConfigError as exc:
        log.warning("SPRM prototype analysis of %s: %s", name, exc)
        entry = {"model": name, "error": str(exc)}
    _merge(run, name, entry)
    log.info("SPRM prototype analysis of %s -> %s", name, run.prototypes)
    return entry
