"""`pantherseq demo` end to end on a small simulator: prepare, three models, the test table."""

from __future__ import annotations

import json

from pantherseq.cli import main


def test_demo_runs_the_chain(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--budget", "2", "--set", "simulate.n_users=60"])
    assert code == 0
    text = capsys.readouterr().out
    assert "[3/3]" in text and "panther" in text and "transformer" in text and "markov" in text
    results = json.loads((out / "eval.json").read_text())
    assert set(results) == {"panther", "transformer", "markov"}
    assert all(r["test"]["n"] > 0 for r in results.values())
    assert (out / "models" / "panther" / "checkpoint.pt").is_file()
