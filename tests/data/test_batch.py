"""data/batch.py: `collate` cuts right-padded windows with next-event targets (UNK never a target)."""

from __future__ import annotations

import numpy as np
import torch

from pantherseq.data.batch import collate
from pantherseq.data.schema import N_SPECIAL, PAD, UNK


def test_collate_pads_shifts_and_masks_targets():
    a, b, c = N_SPECIAL, N_SPECIAL + 1, N_SPECIAL + 2
    tokens = np.array([a, b, UNK, c, a, b], dtype=np.int32)  # user 0: rows 0-3, user 1: rows 4-5
    codes = np.arange(12, dtype=np.int32).reshape(6, 2) + 1
    gaps = np.array([0, 3, 4, 5, 0, 2])
    starts, lengths, users = np.array([0, 4]), np.array([3, 1]), np.array([0, 1])
    profile = torch.zeros(2, 0)
    batch = collate(tokens, codes, gaps, starts, lengths, users, profile.long(), profile,
                    torch.zeros(2, 2, dtype=torch.bool))
    assert batch.tokens.tolist() == [[a, b, UNK], [a, PAD, PAD]]
    assert batch.targets.tolist() == [[b, PAD, c], [b, PAD, PAD]]  # UNK (row 2) is never a target
    assert batch.codes[1, 1:].tolist() == [[0, 0], [0, 0]] and batch.codes[0, 2].tolist() == [5, 6]
    assert batch.gap_bucket.tolist() == [[0, 3, 4], [0, 0, 0]]
    assert batch.mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.users.dtype == torch.int64 and batch.users.tolist() == [0, 1]

    evald = collate(tokens, codes, gaps, starts, lengths, users, profile.long(), profile,
                    torch.zeros(2, 2, dtype=torch.bool), target_from=np.array([3, 5]))
    assert evald.targets.tolist() == [[PAD, PAD, c], [b, PAD, PAD]]
