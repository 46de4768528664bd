"""The trainer, checkpoints, resume, count models and torchrun, on a small simulated run (the evaluation protocol
itself is tested in tests/eval/test_nextevent.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pantherseq.cli import main
from pantherseq.data.dataset import RunData
from pantherseq.model.base import ModelConfig
from pantherseq.train.checkpoint import load_model
from pantherseq.train.loop import PretrainConfig, TrainConfig, train


def small_cfg(**train) -> PretrainConfig:
    model = ModelConfig(d_model=32, n_layers=1, n_heads=2, max_len=32, n_prototypes=8)
    return PretrainConfig(model=model, train=TrainConfig(**{"epochs": 1, "batch_size": 32, "warmup_steps": 5,
                                                             "eval_max_users": None, **train}))


def test_patience_starts_counting_after_the_warm_up(run_dir, monkeypatch):
    """A validation score that never improves: training stops `patience` epochs after the warm-up's end."""
    from pantherseq.train import loop

    steps = RunData(run_dir).train_steps(32, 32)
    monkeypatch.setattr(loop, "_validate", lambda *a, **k: {"ndcg@10": 0.0, "hr@10": 0.0})
    monkeypatch.setattr(loop, "write_prototypes", lambda *a, **k: None)
    # epoch 1 is the best so far; without a warm-up epochs 2, 3 count; warming up until just after epoch 3
    # ends, epochs 4, 5 do
    for warm_epochs, stopped_after in ((0, 3), (3, 5)):
        cfg = small_cfg(epochs=20, patience=2, warmup_steps=warm_epochs * steps + 1 if warm_epochs else 0)
        metrics = train(run_dir, "transformer", cfg, name=f"flat{warm_epochs}")
        assert metrics["epochs"] == stopped_after


def test_train_checkpoint_round_trip_and_resume(run_dir):
    cfg = small_cfg(epochs=1)
    metrics = train(run_dir, "transformer", cfg)
    out = run_dir / "models" / "transformer"
    assert {"checkpoint.pt", "last.pt", "train_log.jsonl", "metrics.json"} <= {p.name for p in out.iterdir()}
    assert metrics["epochs"] == 1 and metrics["train_events_per_s"] > 0 and 0 < metrics["valid"]["hr@10"] <= 1
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # plain tensors and dicts only
    assert ckpt["model_name"] == "transformer" and ckpt["model_config"]["d_model"] == 32
    model, _ = load_model(run_dir, "transformer")
    again, _ = load_model(run_dir, "transformer")
    batch = next(RunData(run_dir).train_batches(32, 8, seed=0))
    assert torch.equal(model.scores(batch), again.scores(batch))
    state = model.state_dict()
    assert all(torch.equal(state[k], ckpt["state_dict"][k]) for k in state)
    # resume: one more epoch continues from last.pt
    cfg2 = small_cfg(epochs=2)
    resumed = train(run_dir, "transformer", cfg2, resume=True)
    assert resumed["epochs"] == 2 and resumed["steps"] == 2 * metrics["steps"]
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]


def test_count_models_and_evaluate_writes_the_table(run_dir, capsys):
    for name in ("popular", "markov"):
        train(run_dir, name, small_cfg())
    assert main(["evaluate", "--run", str(run_dir), "--models", "popular,markov", "--split", "valid,test"]) == 0
    out = capsys.readouterr().out
    assert "popular" in out and "markov" in out and "ndcg@10" in out
    res = json.loads((run_dir / "eval.json").read_text())
    assert set(res["markov"]) == {"valid", "test"}
    # both are far better than chance (10 of ~300 tokens), on exactly the same targets
    vocab = RunData(run_dir).info.vocab_size
    for name in ("popular", "markov"):
        assert res[name]["test"]["hr@10"] > 3 * 10 / vocab
    assert res["markov"]["test"]["n"] == res["popular"]["test"]["n"]


def test_unknown_model_and_missing_run_are_clear_errors(run_dir, tmp_path, capsys):
    assert main(["pretrain", "--run", str(run_dir), "--model", "gpt9"]) == 2
    assert "gpt9" in capsys.readouterr().err
    assert main(["pretrain", "--run", str(tmp_path), "--model", "popular"]) == 2
    assert "not a prepared run" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes(run_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # `--` ends torchrun's own options (its parser would take --run for --run-path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pantherseq.cli", "--", "pretrain", "--run", str(run_dir), "--model", "sasrec",
           "--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.max_len=32",
           "--set", "train.epochs=1", "--set", "train.batch_size=16", "--set", "train.eval_max_users=40"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run_dir / "models" / "sasrec" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] > 0
    model, _ = load_model(run_dir, "sasrec")
    assert sum(p.numel() for p in model.parameters()) == metrics["n_params"]


def test_warm_up_is_a_fraction_of_the_run_unless_steps_are_given():
    from pantherseq.train.loop import warmup_steps

    assert warmup_steps(TrainConfig(warmup=0.05), 1000) == 50
    assert warmup_steps(TrainConfig(warmup=0.05), 40) == 2  # a short run gets a short warm-up
    assert warmup_steps(TrainConfig(warmup=0.05, warmup_steps=7), 1000) == 7


def test_pretrain_help_lists_every_default(capsys):
    import dataclasses

    from pantherseq.cli import main
    from pantherseq.model.base import ModelConfig

    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "train.warmup = 0.05" in out and "model.copy_head = True" in out
    assert all(f"model.{f.name} = " in out for f in dataclasses.fields(ModelConfig))
