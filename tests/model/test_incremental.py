"""model/incremental.py: appending events to a cached window gives the states of the full forward (float64,
1e-9), however the window is cut into appends, for every model `supports` covers."""

from __future__ import annotations

import pytest
import torch
from test_models import VARIANTS, build, make_batch

from pantherseq.fraud.behaviour import float64_copy
from pantherseq.model.base import Batch
from pantherseq.model.incremental import extend, supports

COVERED = [v for v in VARIANTS if v != "hstu"]


def _rows(batch: Batch, row: int, a: int, b: int) -> Batch:
    """Events [a, b) of one row of the batch, with its profile."""
    return Batch(tokens=batch.tokens[row:row + 1, a:b], targets=batch.targets[row:row + 1, a:b],
                 codes=batch.codes[row:row + 1, a:b], gap_bucket=batch.gap_bucket[row:row + 1, a:b],
                 profile_cat=batch.profile_cat[row:row + 1], profile_num=batch.profile_num[row:row + 1].double(),
                 positives=torch.zeros(1, 1, dtype=torch.bool), users=batch.users[row:row + 1])


@pytest.mark.parametrize("variant", COVERED)
def test_appends_give_the_full_forward_states(variant):
    model = float64_copy(build(variant, seed=1))
    assert supports(model)
    lengths = (16, 11, 5, 1)
    batch = make_batch(lengths, seed=2, t=16)
    with torch.no_grad():
        full = model.hidden(Batch(**{**batch.__dict__, "profile_num": batch.profile_num.double()}))  # (B, T, D)
        states, cache = extend(model, Batch(**{**batch.__dict__, "profile_num": batch.profile_num.double()}))
        prefix = int(getattr(model, "profile_mode", "none") == "first_token")
        for r, n in enumerate(lengths):
            torch.testing.assert_close(states[r, :n], full[r, :n], rtol=0, atol=1e-9)
            for first in range(1, n + 1):  # the first `first` events in one pass, then appends of 1, 2, 3, 1, ...
                got, c = extend(model, _rows(batch, r, 0, first))
                c = c.cut(0, first, prefix)
                parts, a, step = [got[0]], first, 1
                while a < n:
                    b = min(n, a + step)
                    s, c = extend(model, _rows(batch, r, a, b), c)
                    parts.append(s[0])
                    a, step = b, step % 3 + 1
                assert c.n == n
                torch.testing.assert_close(torch.cat(parts), full[r, :n], rtol=0, atol=1e-9)
            if n > 1:  # a batched cache cut to a shorter window, then extended
                c = cache.cut(r, n - 1, prefix)
                s, _ = extend(model, _rows(batch, r, n - 1, n), c)
                torch.testing.assert_close(s[0, 0], full[r, n - 1], rtol=0, atol=1e-9)


def test_hstu_is_not_covered():
    assert not supports(build("hstu"))


def test_a_window_cannot_grow_past_max_len():
    model = float64_copy(build("panther"))
    batch = make_batch((16,), t=16)
    with torch.no_grad():
        _, c = extend(model, _rows(batch, 0, 0, 16))
        with pytest.raises(ValueError, match="exceeds max_len"):
            extend(model, _rows(batch, 0, 15, 16), c.cut(0, 16))
