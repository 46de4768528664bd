"""train/checkpoint.py: the one loader round-trips, names the file of a damaged checkpoint and refuses one
from another run (a tokenizer.json other than the one it was trained with)."""

from __future__ import annotations

import pytest
import torch

from pantherseq.data.batch import DataInfo
from pantherseq.errors import ConfigError
from pantherseq.model.base import ModelConfig
from pantherseq.model.registry import build_model
from pantherseq.run import RunDir
from pantherseq.train.checkpoint import checkpoint_path, load_checkpoint, load_model, save_checkpoint

INFO = DataInfo(vocab_size=12, field_sizes=[5])
CFG = ModelConfig(d_model=8, n_layers=1, n_heads=1, max_len=8, n_prototypes=4)


@pytest.fixture
def run(tmp_path) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.tokenizer_file.write_text('{"tokenizer": "a"}')
    model = build_model("transformer", CFG, INFO)
    save_checkpoint(run.checkpoint("t"), model, "transformer", CFG, INFO, run)
    return run


def test_round_trip_by_run_dir_or_path_and_every_name_of_best(run):
    model, ckpt = load_model(run, "t")
    again, _ = load_model(str(run.path), "t", which="checkpoint.pt")
    assert ckpt["model_name"] == "transformer"
    for (k, v), w in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(v, w), k
    assert checkpoint_path(run, "t", "last") == checkpoint_path(run.path, "t", "last.pt") == run.checkpoint("t", "last")
    with pytest.raises(ConfigError, match="not one of best, last"):
        checkpoint_path(run, "t", "newest")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"\x80\x02garbage" * 10])
def test_damaged_checkpoint_is_one_line_naming_the_file(run, content):
    path = run.checkpoint("t")
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_model(run, "t")
    message = str(err.value)
    assert str(path) in message and "cannot be read" in message and "\n" not in message


def test_a_saved_tensor_is_not_a_checkpoint(run):
    torch.save(torch.zeros(3), run.checkpoint("t"))
    with pytest.raises(ConfigError, match="not a checkpoint dict"):
        load_checkpoint(run.checkpoint("t"))


def test_missing_checkpoint_says_pretrain(run):
    with pytest.raises(ConfigError, match="run `pantherseq pretrain` first"):
        load_model(run, "nothing")


def test_checkpoint_of_another_run_is_refused(run):
    run.tokenizer_file.write_text('{"tokenizer": "b"}')
    with pytest.raises(ConfigError, match="belongs to another run"):
        load_model(run, "t")
