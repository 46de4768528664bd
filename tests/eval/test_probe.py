"""User-level probes (SPEC §10): the splitter, the probe's sanity, aggregates, embeddings and the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest

from pantherseq.cli import main
from pantherseq.data.dataset import RunData
from pantherseq.data.schema import load_dataset_config
from pantherseq.errors import ConfigError
from pantherseq.eval.probe import ProbeConfig, probe, stratified_folds, user_targets
from pantherseq.eval.representation import aggregate_features, user_embeddings, user_windows
from pantherseq.model.base import ModelConfig
from pantherseq.model.registry import build_model
from pantherseq.prepare import prepare
from pantherseq.train.checkpoint import model_dir, save_checkpoint

SMALL = ["simulate.n_users=120", "simulate.days=40", "split.t1=\"2024-01-28\"", "split.t2=\"2024-02-03\""]
FAST = ProbeConfig(rounds=60, learning_rate=0.1, min_child_samples=10)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("sim") / "run"
    prepare(load_dataset_config("simulated", overrides=SMALL), run)
    return run


def test_stratified_folds_are_balanced_and_deterministic():
    y = np.array([0] * 53 + [1] * 17 + [2] * 30)
    fold = stratified_folds(y, 5, seed=0)
    for c in range(3):
        per_fold = np.bincount(fold[y == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    sizes = np.bincount(fold, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    assert np.array_equal(fold, stratified_folds(y, 5, seed=0))
    assert not np.array_equal(fold, stratified_folds(y, 5, seed=1))


def test_stratified_folds_reject_a_class_smaller_than_k():
    with pytest.raises(ConfigError, match="fewer than 5 folds"):
        stratified_folds(np.array([0] * 20 + [1] * 3), 5, seed=0)


def test_probe_finds_a_signal_and_not_noise():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 6))
    signal = probe(X, (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int), "binary", cfg=FAST)
    assert signal["mean"] > 0.9 and len(signal["per_fold"]) == 5
    noise = probe(X, rng.integers(0, 2, 400), "binary", cfg=FAST)
    assert abs(noise["mean"] - 0.5) < 0.1
    three = probe(X, np.digitize(X[:, 2], [-0.5, 0.5]), "multiclass", folds=4, repeats=2, cfg=FAST)
    assert three["mean"] > 0.8 and len(three["per_fold"]) == 8


def test_full_history_windows_cover_every_event_once_and_end_at_the_last():
    offsets = np.array([0, 5, 5, 12, 13])  # users of 5, 0, 7 and 1 events
    ends = offsets[1:].copy()
    start, length, user = user_windows(offsets, ends, max_len=3)
    covered = np.concatenate([np.arange(s, s + n) for s, n in zip(start, length)])
    assert np.array_equal(np.sort(covered), np.arange(13))
    assert set(user.tolist()) == {0, 2, 3} and length.max() == 3
    start, length, user = user_windows(offsets, ends, max_len=3, history="last")
    assert start.tolist() == [2, 9, 12] and length.tolist() == [3, 3, 1] and user.tolist() == [0, 2, 3]


def test_aggregates_one_row_per_user(run_dir):
    users, X, names = aggregate_features(run_dir)
    events = pl.read_parquet(run_dir / "users.parquet").sort("user_idx")["events"].to_numpy()
    assert X.shape == (len(events), len(names)) and np.array_equal(users, np.arange(len(events)))
    assert len(set(names)) == len(names) and "amount_mean" in names and "channel=online" in names
    count = X[:, names.index("count")]
    assert not np.isnan(count).any() and np.array_equal(count, events)
    train_count = aggregate_features(run_dir, "train")[1][:, names.index("count")]
    assert (train_count <= count).all() and train_count.sum() < count.sum()


def test_targets_of_the_simulator(run_dir):
    users, y = user_targets(run_dir, "fraud_victim")
    labels = pl.read_parquet(run_dir / "events.parquet", columns=["user_idx", "label"])
    assert y.sum() == labels.filter(pl.col("label") == 1)["user_idx"].n_unique()
    users, y = user_targets(run_dir, "persona")
    assert len(users) == 120 and y.max() < 6


def test_panther_embedding_ignores_the_users_own_profile(run_dir, tmp_path):
    """profile="mean": shuffling the profile table between users changes nothing; "keep" does change."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    data = RunData(run)
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, max_len=16, n_prototypes=4)
    save_checkpoint(model_dir(run, "p") / "checkpoint.pt", build_model("panther", cfg, data.info), "panther", cfg,
                    data.info, run)
    before = {p: user_embeddings(run, "p", profile=p, progress=False)[1] for p in ("mean", "keep")}
    profile = pl.read_parquet(run / "profile.parquet")
    profile.with_columns(pl.col("user_idx").shuffle(seed=1)).write_parquet(run / "profile.parquet")
    after = {p: user_embeddings(run, "p", profile=p, progress=False)[1] for p in ("mean", "keep")}
    assert np.allclose(before["mean"], after["mean"], atol=1e-5)
    assert not np.allclose(before["keep"], after["keep"], atol=1e-3)
    assert before["mean"].shape == (120, 16) and not np.isnan(before["mean"]).any()


def test_a_model_that_read_the_target_as_a_profile_input_is_refused(run_dir, tmp_path, capsys):
    """PANTHER trained with gender in its profile cannot be probed on gender; without the profile it can,
    and a target that is not a profile input (persona) is allowed either way."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    data = RunData(run)
    for name, mode in (("with_profile", "positional"), ("no_profile", "none")):
        cfg = ModelConfig(d_model=8, n_layers=1, n_heads=2, max_len=8, n_prototypes=4, profile_mode=mode)
        save_checkpoint(model_dir(run, name) / "checkpoint.pt", build_model("panther", cfg, data.info), "panther",
                        cfg, data.info, run)
    probe_args = ["probe", "--run", str(run), "--folds", "3", "--rounds", "5", "--repeats", "1"]
    assert main([*probe_args, "--target", "gender", "--embeddings", "aggregates+with_profile"]) == 2
    err = capsys.readouterr().err
    assert "'with_profile' was trained with the profile field 'gender'" in err and "profile_mode" in err
    assert main([*probe_args, "--target", "gender", "--embeddings", "no_profile"]) == 0
    assert main([*probe_args, "--target", "persona", "--embeddings", "with_profile"]) == 0


@pytest.mark.slow
def test_cli_probe_end_to_end(run_dir, capsys):
    code = main(["pretrain", "--run", str(run_dir), "--model", "transformer", "--set", "train.time_budget_s=5",
                 "--set", "model.d_model=16", "--set", "model.n_layers=1", "--set", "model.max_len=16",
                 "--set", "train.epochs=1", "--set", "train.eval_max_users=20", "--set", "train.threads=1"])
    assert code == 0
    np.save(run_dir / "ones.npy", np.ones((120, 2), dtype=np.float32))
    code = main(["probe", "--run", str(run_dir), "--target", "gender", "--folds", "3", "--rounds", "20",
                 "--embeddings", f"aggregates,transformer,aggregates+transformer,{run_dir / 'ones.npy'}"])
    assert code == 0
    out = capsys.readouterr().out
    assert "aggregates+transformer" in out and "probe.json" in out
    report = json.loads((run_dir / "probe.json").read_text())["gender"]
    assert report["task"] == "binary" and report["users"] == 120
    dims = {n: r["dim"] for n, r in report["results"].items()}
    assert dims["transformer"] == 16 and dims["aggregates+transformer"] == dims["aggregates"] + 16
    assert all(0.0 <= r["mean"] <= 1.0 for r in report["results"].values())
    assert report["results"][str(run_dir / "ones.npy")]["mean"] == 0.5  # a constant scores exactly chance


@pytest.mark.parametrize("argv, message", [
    (["--target", "height", "--embeddings", "aggregates"], "unknown target 'height'"),
    (["--target", "gender", "--embeddings", "nosuchmodel"], "unknown representation 'nosuchmodel'"),
    (["--target", "gender", "--embeddings", "llm4es"], "llm4es/embeddings.npy"),
    (["--target", "gender", "--embeddings", "/no/such/file.npy"], "no file /no/such/file.npy"),
])
def test_cli_probe_bad_input_exits_2_with_one_line(run_dir, capsys, argv, message):
    assert main(["probe", "--run", str(run_dir), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
