"""Next-behaviour evaluation (eval/nextevent.py): a hand-made oracle scores HR@1 = 1, and every target of a split
is ranked exactly once with enough context, on a small simulated run."""

from __future__ import annotations

import numpy as np
import torch

from pantherseq.data.dataset import RunData
from pantherseq.data.schema import PAD, UNK
from pantherseq.eval.nextevent import evaluate_split
from pantherseq.model.base import SequenceModel


class Oracle(SequenceModel):
    """Scores the true next token highest: evaluation must give HR@1 = 1."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def target_scores(self, batch):
        keep = batch.targets != PAD
        y = batch.targets[keep]
        return torch.nn.functional.one_hot(y, self.vocab).float(), y


def test_an_oracle_scores_hr1_of_one(run_dir):
    data = RunData(run_dir)
    res = evaluate_split(Oracle(data.info.vocab_size), data, "test", max_len=16)
    assert res["n"] > 100 and res["hr@1"] == 1.0 and res["mrr"] == 1.0 and res["ndcg@10"] == 1.0


def test_every_eval_target_once_with_enough_context(run_dir):
    data = RunData(run_dir)
    seq = data.seq
    max_len = 16
    win = data.eval_windows("test", max_len)
    seen = []
    for start, length, first in win.tolist():
        batch = data._batch(np.array([start]), np.array([length]), target_from=np.array([first]))
        pos = np.flatnonzero(batch.targets[0].numpy() != PAD)
        for p in pos.tolist():
            target = start + p + 1
            user = data.user_of[target]
            context = p + 1
            assert context >= min(max_len // 2, target - seq.offsets[user])
            seen.append(target)
    expected = [i for i in np.flatnonzero(np.asarray(seq.split) == 2).tolist()
                if i not in set(seq.offsets[:-1].tolist()) and seq.tokens[i] != UNK]
    assert sorted(seen) == expected


def test_repeat_and_explore_split_the_targets_by_the_users_history(run_dir):
    """repeat_n counts the test targets whose token occurred at an earlier event of the user (a loop over the
    flat arrays, independent of `seen_before`), explore_n the rest; the oracle wins both."""
    data = RunData(run_dir)
    seq = data.seq
    tokens, offsets = np.asarray(seq.tokens), np.asarray(seq.offsets)
    starts = set(offsets[:-1].tolist())
    repeat = explore = 0
    for i in np.flatnonzero(np.asarray(seq.split) == 2).tolist():
        if i in starts or tokens[i] == UNK:
            continue
        s = offsets[data.user_of[i]]
        if tokens[i] in set(tokens[s:i].tolist()):
            repeat += 1
        else:
            explore += 1
    res = evaluate_split(Oracle(data.info.vocab_size), data, "test", max_len=16)
    assert (res["repeat_n"], res["explore_n"]) == (repeat, explore) and repeat > 0 and explore > 0
    assert res["repeat_hr@10"] == 1.0 and res["explore_hr@10"] == 1.0
