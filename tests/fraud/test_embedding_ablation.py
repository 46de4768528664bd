"""The embedding ablation's knob: `embedding_dims` PCA components of each user state, 0 = dropped, -1 = all."""

from __future__ import annotations

import numpy as np
import pytest

from pantherseq.fraud.behaviour import BehaviourFeatures
from pantherseq.fraud.pipeline import _embedding_columns, embedding_summary, format_fraud_table, project


def _states(n: int = 60, d: int = 6) -> BehaviourFeatures:
    rng = np.random.default_rng(0)
    return BehaviourFeatures(np.arange(1, n + 1), {}, rng.normal(size=(n, d)).astype(np.float32),
                             rng.normal(size=(n, d)).astype(np.float32))


@pytest.mark.parametrize(("k", "per_state", "how"), [(0, 0, "dropped"), (2, 2, "PCA"), (-1, 6, "all dimensions")])
def test_embedding_dims_keeps_k_components_or_drops_them(k, per_state, how):
    bf = _states()
    rows = np.arange(0, 61)  # row 0 has no history: NaN
    cols, pca = _embedding_columns(bf, rows, rows[:40], k)
    assert len(cols) == 2 * per_state
    assert sorted(cols)[:1] == ([] if k == 0 else ["pool_0"])
    summary = embedding_summary(k, pca)
    assert summary == {"embedding_dims": k, "state_dims": 6, "dims_per_state": per_state,
                       "columns": 2 * per_state, "reduction": how}
    # the service projects with the saved components: no column when dropped, the same values otherwise
    one = project(bf.recent[4:5], pca["rec_mean"], pca["rec_comps"])
    assert one.shape == (1, per_state)
    if per_state:
        assert np.isnan(cols["rec_0"][0]) and one[0, 0] == cols["rec_0"][5]


def test_the_fraud_table_reports_the_embeddings():
    report = {"feature_sets": {"baseline": {"average_precision": 0.5}},
              "embedding": {"embedding_dims": 0, "state_dims": 32, "dims_per_state": 0, "columns": 0,
                            "reduction": "dropped"}}
    assert "user-state embeddings (pooled, recent): dropped" in format_fraud_table(report)

