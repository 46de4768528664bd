"""model/incremental.py: appending events to cached windows gives the states of the full forward (float64,
1e-9), however each window is cut into appends and whatever the other windows of the batch, for every
model `supports` covers."""

from __future__ import annotations

import pytest
import torch
from test_models import VARIANTS, build, make_batch

from pantherseq.fraud.behaviour import float64_copy
from pantherseq.model.base import PAD, Batch
from pantherseq.model.incremental import extend, freeze, supports

COVERED = [v for v in VARIANTS if v != "hstu"]


def _rows(batch: Batch, spans: list[tuple[int, int, int]]) -> Batch:
    """The events [a, b) of rows r, right-padded, with their profiles: spans [(r, a, b), ...]."""
    T = max(b - a for _, a, b in spans)
    n = len(spans)
    tokens = torch.full((n, T), PAD)
    codes = torch.zeros(n, T, batch.codes.shape[2], dtype=torch.long)
    gap = torch.zeros(n, T, dtype=torch.long)
    for i, (r, a, b) in enumerate(spans):
        tokens[i, :b - a], codes[i, :b - a], gap[i, :b - a] = batch.tokens[r, a:b], batch.codes[r, a:b], \
            batch.gap_bucket[r, a:b]
    rows = [r for r, _, _ in spans]
    return Batch(tokens=tokens, targets=torch.zeros_like(tokens), codes=codes, gap_bucket=gap,
                 profile_cat=batch.profile_cat[rows], profile_num=batch.profile_num[rows].double(),
                 positives=torch.zeros(n, n, dtype=torch.bool), users=batch.users[rows])


@pytest.mark.parametrize("variant", COVERED)
def test_appends_give_the_full_forward_states(variant):
    model = freeze(float64_copy(build(variant, seed=1)))
    assert supports(model)
    lengths = (16, 11, 5, 1)
    batch = make_batch(lengths, seed=2, t=16)
    with torch.no_grad():
        full = model.hidden(Batch(**{**batch.__dict__, "profile_num": batch.profile_num.double()}))  # (B, T, D)
        states, _ = extend(model, _rows(batch, [(r, 0, n) for r, n in enumerate(lengths)]))
        for r, n in enumerate(lengths):
            torch.testing.assert_close(states[r, :n], full[r, :n], rtol=0, atol=1e-9)
        for first in range(1, 17):  # every row's first `first` events in one pass, then appends of 1, 2, 3, 1, ...
            pos = [min(first, n) for n in lengths]
            got, caches = extend(model, _rows(batch, [(r, 0, p) for r, p in enumerate(pos)]))
            parts = [[got[r, :p]] for r, p in enumerate(pos)]
            step = 1
            while any(p < n for p, n in zip(pos, lengths)):
                todo = [r for r, (p, n) in enumerate(zip(pos, lengths)) if p < n]  # windows of other lengths
                ends = [min(lengths[r], pos[r] + step + r % 2) for r in todo]
                s, new = extend(model, _rows(batch, [(r, pos[r], e) for r, e in zip(todo, ends)]),
                                [caches[r] for r in todo])
                for i, (r, e) in enumerate(zip(todo, ends)):
                    parts[r].append(s[i, :e - pos[r]])
                    caches[r], pos[r] = new[i], e
                step = step % 3 + 1
            for r, n in enumerate(lengths):
                assert caches[r].n == n
                torch.testing.assert_close(torch.cat(parts[r]), full[r, :n], rtol=0, atol=1e-9)


def test_hstu_is_not_covered():
    assert not supports(build("hstu"))


def test_a_window_cannot_grow_past_max_len():
    model = float64_copy(build("panther"))
    batch = make_batch((16,), t=16)
    with torch.no_grad():
        _, caches = extend(model, _rows(batch, [(0, 0, 16)]))
        with pytest.raises(ValueError, match="exceeds max_len"):
            extend(model, _rows(batch, [(0, 15, 16)]), caches)
