"""`pantherseq demo` end to end on a small simulator: prepare, four models, evaluation, fraud, embed,
the service over HTTP, the report, the summary."""

from __future__ import annotations

import json

import pytest

from pantherseq.cli import main


@pytest.mark.slow
def test_demo_runs_the_whole_chain(tmp_path, capsys):
    out = tmp_path / "demo"
    # 400 users at the default fraud rate leave the risk model's two weeks a fraud or two: raise the rate
    code = main(["demo", "--out", str(out), "--epochs", "1", "--set", "simulate.n_users=400",
                 "--set", "simulate.fraud_user_rate=0.15"])
    assert code == 0
    text = capsys.readouterr().out
    for step in range(1, 8):
        assert f"[{step}/7]" in text
    assert "pantherseq demo: done" in text and "hybrid" in text
    results = json.loads((out / "eval.json").read_text())
    assert set(results) == {"panther", "transformer", "personal", "markov"}
    assert all(r["test"]["n"] > 0 for r in results.values())
    fraud = json.loads((out / "fraud" / "fraud.json").read_text())
    assert set(fraud["feature_sets"]) == {
        "baseline", "baseline+robust_z", "baseline+embedding", "baseline+deviation", "baseline+robust_z+deviation",
        "hybrid"}
    served = json.loads((out / "serve_demo.json").read_text())
    assert served["requests"] == len(served["latencies_ms"]) > 0
    assert all(r["score"] is not None for r in served["responses"])
    assert (out / "states.db").is_file() and (out / "report.html").is_file() and (out / "report.md").is_file()
