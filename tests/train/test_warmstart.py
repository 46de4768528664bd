"""train/warmstart.py: `pretrain --init-from` loads a checkpoint as it is for the same tokenizer (the model
predicts as the checkpoint did before any step), matches rows by readable labels for another run's vocabulary,
takes the architecture from the checkpoint and refuses a conflicting `model.*` key with one line."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

from conftest import SMALL
from pantherseq.cli import main
from pantherseq.data.dataset import RunData
from pantherseq.data.schema import N_SPECIAL, load_dataset_config
from pantherseq.errors import ConfigError
from pantherseq.model.base import ModelConfig
from pantherseq.model.registry import build_model
from pantherseq.prepare import prepare
from pantherseq.run import RunDir
from pantherseq.train.checkpoint import load_model
from pantherseq.train.loop import PretrainConfig, TrainConfig, load_pretrain_config, train
from pantherseq.train.warmstart import load_init, warm_start
from test_cli_errors import cli, error_line

TOKENS = 'tokenizer.fields=["channel", "merchant_id"]'  # categorical: labels that mean the same in both runs
MODEL = ModelConfig(d_model=16, n_layers=1, n_heads=1, max_len=16, n_prototypes=4, dropout=0.0,
                    field_embeddings=True, field_heads=True, tie_weights=False)
QUICK = ["train.epochs=1", "train.eval_max_users=20", "train.batch_size=32", "train.threads=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Run a (seed 0) with a one-epoch PANTHER, run b (seed 1: another vocabulary, partly the same labels)."""
    root = tmp_path_factory.mktemp("warm")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        out[name] = root / name
        prepare(load_dataset_config("simulated", overrides=[*SMALL, TOKENS, f"simulate.seed={seed}"]), out[name])
    train(out["a"], "panther", PretrainConfig(model=MODEL, train=TrainConfig(epochs=1, batch_size=32,
                                                                            eval_max_users=20, threads=1)))
    out["ckpt"] = out["a"] / "models" / "panther"
    return out


def _scores(model, run: Path) -> torch.Tensor:
    data = RunData(run)
    batch = data._batch(torch.arange(0, 160, 40).numpy(), torch.full((4,), 12).numpy())
    with torch.no_grad():
        return model.eval().scores(batch)


def test_same_tokenizer_loads_the_weights_as_they_are(runs):
    source = load_init(runs["ckpt"])
    cfg = load_pretrain_config(init_from=source)
    assert cfg.model == MODEL and cfg.init_from == str(runs["ckpt"])
    core = build_model("panther", cfg.model, RunData(runs["a"]).info)
    record = warm_start(core, source, RunDir(runs["a"]))
    assert record["same_tokenizer"] and record["fresh"] == [] and record["tokens_matched"] == record["tokens_total"]
    original, _ = load_model(runs["a"], "panther")
    assert torch.equal(_scores(core, runs["a"]), _scores(original, runs["a"]))


def test_fine_tuning_with_no_step_size_keeps_the_checkpoints_predictions(runs):
    """Through the trainer: lr = 0, so the fine-tuned model still predicts exactly as the checkpoint."""
    cfg = load_pretrain_config(overrides=[*QUICK, "train.lr=0.0"], init_from=runs["ckpt"])
    metrics = train(runs["a"], "panther", cfg, name="tuned")
    assert metrics["init_from"]["same_tokenizer"] and metrics["init_from"]["path"].endswith("checkpoint.pt")
    tuned, _ = load_model(runs["a"], "tuned")
    original, _ = load_model(runs["a"], "panther")
    assert torch.equal(_scores(tuned, runs["a"]), _scores(original, runs["a"]))


def test_another_vocabulary_is_matched_by_label(runs):
    source = load_init(runs["ckpt"])
    cfg = load_pretrain_config(init_from=source)
    info = RunData(runs["b"]).info
    torch.manual_seed(5)
    fresh = build_model("panther", cfg.model, info)
    torch.manual_seed(5)
    core = build_model("panther", cfg.model, info)
    record = warm_start(core, source, RunDir(runs["b"]))
    tok_a, tok_b = RunDir(runs["a"]).tokenizer(), RunDir(runs["b"]).tokenizer()
    labels_a, labels_b = tok_a.token_labels(), tok_b.token_labels()
    both = set(labels_a[N_SPECIAL:]) & set(labels_b[N_SPECIAL:])
    assert not record["same_tokenizer"] and record["tokens_matched"] == len(both)
    assert 0 < len(both) < record["tokens_total"] == len(labels_b) - N_SPECIAL
    assert labels_a != labels_b  # the runs number their tokens differently
    original, _ = load_model(runs["a"], "panther")
    index_a = {label: i for i, label in enumerate(labels_a)}
    for name in ("token_emb.weight", "out_proj.weight", "out_bias"):
        src, dst, init = original.state_dict()[name], core.state_dict()[name], fresh.state_dict()[name]
        for i, label in enumerate(labels_b):
            assert torch.equal(dst[i], src[index_a[label]] if label in index_a else init[i]), (name, label)
    f_a, f_b = tok_a.field_names.index("channel"), tok_b.field_names.index("channel")
    values_a = [tok_a.encoders[f_a].label(c) for c in range(tok_a.field_sizes[f_a])]
    for c in range(tok_b.field_sizes[f_b]):  # the field rows by value label
        value = tok_b.encoders[f_b].label(c)
        got = core.state_dict()[f"embedding.field_embs.{f_b}.weight"][c]
        assert torch.equal(got, original.state_dict()[f"embedding.field_embs.{f_a}.weight"][values_a.index(value)])
    assert torch.equal(core.state_dict()["blocks.0.attn.qkv.weight"], original.state_dict()["blocks.0.attn.qkv.weight"])
    assert any(n.startswith("profile.cat_embs.") for n in record["fresh"])  # run-specific codes start fresh


def test_conflicting_architecture_is_refused_training_keys_are_not(runs):
    with pytest.raises(ConfigError, match=r"model.d_model = 32 conflicts .* model.d_model = 16"):
        load_pretrain_config(overrides=["model.d_model=32"], init_from=runs["ckpt"])
    cfg = load_pretrain_config(overrides=["model.d_model=16", "model.dropout=0.2"], init_from=runs["ckpt"])
    assert cfg.model.dropout == 0.2 and cfg.model.field_heads
    line = error_line(cli("pretrain", "--run", runs["b"], "--init-from", runs["ckpt"], "--set", "model.n_layers=3"),
                      "model.n_layers = 3", "conflicts", "architecture comes from the checkpoint")
    assert "\n" not in line


@pytest.mark.slow
def test_other_model_or_no_checkpoint_is_one_line(runs):
    error_line(cli("pretrain", "--run", runs["b"], "--init-from", runs["ckpt"], "--model", "sasrec"),
               "--model sasrec", "'panther'")
    error_line(cli("pretrain", "--run", runs["b"], "--init-from", runs["a"] / "models" / "none"), "no checkpoint")


def test_count_models_cannot_be_fine_tuned(runs):
    train(runs["a"], "markov", PretrainConfig(model=ModelConfig(max_len=16), train=TrainConfig(eval_max_users=20)))
    with pytest.raises(ConfigError, match="count model"):
        load_init(runs["a"] / "models" / "markov")


def test_cli_records_init_from(runs):
    assert main(["pretrain", "--run", str(runs["b"]), "--init-from", str(runs["ckpt"]), "--name", "warm",
                 *[a for s in QUICK for a in ("--set", s)]]) == 0
    run = RunDir(runs["b"])
    metrics = json.loads(run.model_metrics("warm").read_text())
    assert metrics["model"] == "panther" and not metrics["init_from"]["same_tokenizer"]
    assert metrics["init_from"]["tokens_matched"] > 0
    saved = tomllib.loads(run.pretrain_config("warm").read_text())
    assert saved["init_from"] == str(runs["ckpt"]) and saved["model"]["d_model"] == 16
