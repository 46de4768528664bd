"""The SPRM prototype analysis (eval/prototypes.py): pretraining PANTHER writes RUN/prototypes.json, a fresh
analysis of the saved model gives the same numbers, a model without SPRM leaves no entry, and the 3-gram
counting on a hand-made sequence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pantherseq.data.dataset import RunData
from pantherseq.eval.prototypes import frequent_ngrams, write_prototypes
from pantherseq.model.base import ModelConfig
from pantherseq.model.panther import Transformer
from pantherseq.run import RunDir


def test_frequent_ngrams_count_within_one_users_kept_events():
    # user 0: 5 6 7 5 6 7 5 (5-6-7 twice, 6-7-5 twice, 7-5-6 once); user 1: 6 7 5 (a third 6-7-5)
    tokens = np.array([5, 6, 7, 5, 6, 7, 5, 6, 7, 5])
    offsets = np.array([0, 7, 10])
    grams, counts, occ = frequent_ngrams(tokens, offsets, np.ones(10, bool))
    assert grams.tolist() == [[6, 7, 5], [5, 6, 7]] and counts.tolist() == [3, 2]
    assert [o.tolist() for o in occ] == [[1, 4, 7], [0, 3]]  # 7-5-6 once: the one at row 5 spans two users
    keep = np.ones(10, bool)
    keep[4] = False  # drops every 3-gram through row 4
    grams, counts, _ = frequent_ngrams(tokens, offsets, keep)
    assert grams.tolist() == [[6, 7, 5]] and counts.tolist() == [2]


@pytest.fixture(scope="module")
def copy_run(trained_run: Path, tmp_path_factory) -> RunDir:
    """The shared trained run without other stages' outputs (other tests write into the original)."""
    run = tmp_path_factory.mktemp("prototypes") / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("fraud", "eval.json", "report*", "states.db*"))
    return RunDir(run)


@pytest.mark.slow
def test_pretraining_panther_writes_its_prototype_analysis(copy_run):
    entry = json.loads(copy_run.prototypes.read_text())["panther"]
    att = np.asarray(entry["attention"])  # (G, M)
    G = len(entry["grams"])
    assert 1 <= G <= 12 and att.shape == (G, entry["n_prototypes"]) == (G, 8)
    assert np.allclose(att.sum(1), 1.0, atol=1e-5)  # a mean of softmax rows over the prototypes
    assert entry["counts"] == sorted(entry["counts"], reverse=True) and min(entry["counts"]) >= 2
    tokenizer = copy_run.tokenizer()
    assert entry["labels"] == [[tokenizer.token_label(t) for t in g] for g in entry["grams"]]
    assert entry["token_fields"] == list(tokenizer.token_fields)


@pytest.mark.slow
def test_a_fresh_analysis_of_the_checkpoint_gives_the_same_weights(copy_run):
    written = json.loads(copy_run.prototypes.read_text())["panther"]
    again = write_prototypes(copy_run, "panther")  # loads models/panther/checkpoint.pt
    assert again["grams"] == written["grams"] and again["counts"] == written["counts"]
    # the same weights on the same windows; the training ran on 1 torch thread and this process may use more,
    # so the float32 sums may run in another order: equal to ~1e-7, not bit for bit
    np.testing.assert_allclose(again["attention"], written["attention"], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_model_without_sprm_leaves_no_entry(copy_run):
    data = RunData(copy_run)
    model = Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, max_len=8), data.info)
    before = json.loads(copy_run.prototypes.read_text())
    before["old"] = before["panther"]
    copy_run.prototypes.write_text(json.dumps(before))
    assert write_prototypes(copy_run, "old", model, data) is None
    assert set(json.loads(copy_run.prototypes.read_text())) == {"panther"}
