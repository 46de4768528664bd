"""`prepare` on a seeded part of the users ([users]) and with another run's tokenizer (--tokenizer-from): the two
parts of a user split are disjoint and cover every user, counts reconcile, the tokenizer file is copied byte for
byte so a model of the first run loads into the second as it is (warmstart's same-tokenizer path)."""

from __future__ import annotations

import dataclasses
import json

import polars as pl
import pytest
import torch

from conftest import SMALL
from pantherseq.cli import main
from pantherseq.data.dataset import RunData
from pantherseq.data.schema import UsersConfig, load_dataset_config
from pantherseq.data.split import chosen_users
from pantherseq.errors import ConfigError
from pantherseq.model.base import ModelConfig
from pantherseq.model.registry import build_model
from pantherseq.prepare import prepare
from pantherseq.run import RunDir
from pantherseq.train.checkpoint import file_sha256
from pantherseq.train.loop import PretrainConfig, TrainConfig, train
from pantherseq.train.warmstart import load_init, warm_start

PART = ["users.fraction=0.8", "users.seed=3"]
REST = [*PART, "users.complement=true"]


def test_chosen_users_are_exact_seeded_and_order_free():
    users = [f"u{i}" for i in range(101)]
    a = chosen_users(users, UsersConfig(fraction=0.8, seed=1))
    b = chosen_users(list(reversed(users)), UsersConfig(fraction=0.8, seed=1))
    rest = chosen_users(users, UsersConfig(fraction=0.8, seed=1, complement=True))
    assert a == b and len(a) == 81 and not a & rest and a | rest == set(users)
    assert chosen_users(users, UsersConfig(fraction=0.8, seed=2)) != a
    with pytest.raises(ConfigError, match="complement"):
        load_dataset_config("simulated", overrides=["users.complement=true"])
    with pytest.raises(ConfigError, match="fraction"):
        load_dataset_config("simulated", overrides=["users.fraction=0"])


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory):
    """The 80 % users (fits the tokenizer) and the other 20 % (re-uses it), from the same simulation."""
    root = tmp_path_factory.mktemp("users")
    big, small = root / "big", root / "small"
    prepare(load_dataset_config("simulated", overrides=[*SMALL, *PART]), big)
    prepare(load_dataset_config("simulated", overrides=[*SMALL, *REST]), small, tokenizer_from=big)
    return big, small


def test_user_parts_are_disjoint_cover_all_and_reconcile(split_runs, run_dir):
    big, small = (RunDir(p) for p in split_runs)
    everyone = set(RunDir(run_dir).read_users()["user_id"].to_list())
    a, b = (set(r.read_users()["user_id"].to_list()) for r in (big, small))
    assert not a & b and a | b == everyone and len(a) == round(0.8 * len(everyone))
    for r, users in ((big, a), (small, b)):
        report = r.read_prepare_report()
        assert report["users"] == len(users)
        assert report["rows_kept"] + sum(report["rows_dropped"].values()) == report["rows_read"]
        assert report["rows_dropped"]["user_not_chosen"] > 0
        profile = r.read_profile()
        assert set(profile["user_id"].to_list()) == users
    kept = sum(r.read_prepare_report()["rows_kept"] for r in (big, small))
    assert kept == RunDir(run_dir).read_prepare_report()["rows_kept"]


def test_tokenizer_from_copies_the_file_and_encodes_with_it(split_runs):
    big, small = (RunDir(p) for p in split_runs)
    assert small.tokenizer_file.read_bytes() == big.tokenizer_file.read_bytes()
    report = small.read_prepare_report()
    assert report["tokenizer_from"] == str(big) and report["vocab_size"] == big.tokenizer().vocab_size
    tok = big.tokenizer()
    events = small.read_events()
    assert (tok.transform(events).tokens == events["token"].to_numpy()).all()
    # the training period of the small run was not fitted on: some of its events may be UNK, none is lost
    assert events.height == report["rows_kept"]


def test_tokenizer_from_refuses_other_fields(split_runs, tmp_path):
    big, _ = split_runs
    cfg = load_dataset_config("simulated", overrides=[*SMALL, 'tokenizer.fields=["channel"]'])
    with pytest.raises(ConfigError, match="token"):
        prepare(cfg, tmp_path / "x", tokenizer_from=big)
    cfg = load_dataset_config("simulated", overrides=SMALL)
    cfg = dataclasses.replace(cfg, fields=[dataclasses.replace(f, bins=5) if f.name == "amount" else f
                                           for f in cfg.fields])
    with pytest.raises(ConfigError, match="'amount' has bins = 5"):
        prepare(cfg, tmp_path / "y", tokenizer_from=big)
    with pytest.raises(ConfigError, match="not a prepared run|does not exist"):
        prepare(load_dataset_config("simulated", overrides=SMALL), tmp_path / "z", tokenizer_from=tmp_path)


def test_a_model_of_the_first_part_loads_as_it_is(split_runs):
    big, small = split_runs
    model = ModelConfig(d_model=16, n_layers=1, n_heads=1, max_len=16, n_prototypes=4, dropout=0.0)
    train(big, "panther", PretrainConfig(model=model, train=TrainConfig(epochs=1, batch_size=32,
                                                                        eval_max_users=20, threads=1)))
    source = load_init(big / "models" / "panther")
    assert file_sha256(source.tokenizer_file) == file_sha256(RunDir(small).tokenizer_file)
    net = build_model("panther", model, RunData(small).info)
    record = warm_start(net, source, RunDir(small))
    assert record["same_tokenizer"] and record["tokens_matched"] == record["tokens_total"]
    for name, value in source.ckpt["state_dict"].items():
        if not name.startswith("profile."):
            assert torch.equal(net.state_dict()[name], value), name


def test_cli_prepare_with_users_and_tokenizer_from(split_runs, tmp_path, capsys):
    big, _ = split_runs
    out = tmp_path / "cli"
    rc = main(["prepare", "--dataset", "simulated", "--out", str(out), "--tokenizer-from", str(big),
               *[a for s in [*SMALL, *REST] for a in ("--set", s)]])
    assert rc == 0 and "prepared" in capsys.readouterr().out
    report = json.loads((out / "prepare.json").read_text())
    assert report["tokenizer_from"] == str(big)
    users = set(pl.read_parquet(out / "users.parquet")["user_id"].to_list())
    assert users == set(RunDir(split_runs[1]).read_users()["user_id"].to_list())
