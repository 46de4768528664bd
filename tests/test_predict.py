"""predict.py: next behaviour and embeddings for users of any events file, new users and unknown values
included; the embedding is the service's; bad input is one line naming the file, row and column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import HANDBOOK_HEADER, handbook_rows, write_lines
from pantherseq.cli import main
from pantherseq.data.schema import UNK
from pantherseq.errors import ConfigError, DataError
from pantherseq.model.base import ModelConfig
from pantherseq.predict import predict
from pantherseq.train.loop import PretrainConfig, TrainConfig, train
from test_cli_errors import cli, error_line

COLUMNS = ["user_id", "timestamp", "channel", "amount", "category", "merchant_risk", "merchant_id"]
TINY = ModelConfig(d_model=16, n_layers=1, n_heads=1, max_len=16, n_prototypes=4, dropout=0.0, field_heads=True,
                   copy_head=True, history=32)


@pytest.fixture(scope="module")
def trained(run_dir: Path) -> Path:
    """The tiny simulated run with a one-epoch PANTHER (field heads, copy head) and two count models."""
    cfg = PretrainConfig(model=TINY, train=TrainConfig(epochs=1, batch_size=32, eval_max_users=20, threads=1))
    train(run_dir, "panther", cfg)
    for name in ("markov", "personal"):
        train(run_dir, name, PretrainConfig(model=ModelConfig(max_len=16), train=TrainConfig(eval_max_users=20)))
    return run_dir


def run_users(run: Path, n: int = 4) -> pl.DataFrame:
    """The run's first `n` users' events, in the simulator's own columns (the run's source layout)."""
    ev = pl.read_parquet(run / "events.parquet")
    users = ev["user_id"].unique().sort().head(n).to_list()
    return ev.filter(pl.col("user_id").is_in(users)).select(COLUMNS)


def new_users(run: Path) -> pl.DataFrame:
    """Two users the run never saw: one with values the tokenizer never saw, one with a single event."""
    base = run_users(run, 1).head(6)
    odd = base.with_columns(pl.lit("new-a").alias("user_id"),
                            pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.lit("spaceship"))
                            .otherwise(pl.col("category")).alias("category"))
    one = base.head(1).with_columns(pl.lit("new-b").alias("user_id"))
    return pl.concat([odd, one])


def test_shapes_probabilities_and_labels(trained, tmp_path):
    path = tmp_path / "ev.parquet"
    run_users(trained).write_parquet(path)
    out = predict(trained, "panther", path, top_k=7)
    assert out.height == 4 and out["known_user"].all()
    for row in out.iter_rows(named=True):
        p = np.array(row["top_p"])
        assert len(p) == len(row["top_tokens"]) == len(row["top_labels"]) == 7
        assert np.all(np.diff(p) <= 0) and p.sum() <= 1 + 1e-6 and p.min() > 0
        assert min(row["top_tokens"]) >= 4  # never a special id
        assert all("channel=" in label and "|amount=" in label for label in row["top_labels"])
        assert len(row["h"]) == len(row["pooled"]) == TINY.d_model
        assert 0 < row["next_amount_p"] <= 1 and row["next_category"] is not None
    assert {"next_channel", "next_hour", "next_log_gap_p"} <= set(out.columns)


def test_new_users_and_unknown_values(trained, tmp_path):
    path = tmp_path / "new.csv"
    new_users(trained).write_csv(path)
    out = predict(trained, "panther", path, top_k=3).sort("user_id")
    assert out["user_id"].to_list() == ["new-a", "new-b"] and not out["known_user"].any()
    assert out["events"].to_list() == [6, 1]
    assert out["unk_events"][0] == 3  # "spaceship" is the category's UNK, so the token is UNK
    assert all(np.isfinite(r).all() for r in out["h"].to_list())


def test_embedding_is_the_services(trained, tmp_path):
    from pantherseq.data.sequences import Sequences
    from pantherseq.serve.embed import event_amounts, user_states
    from pantherseq.serve.scorer import Scorer

    path = tmp_path / "ev.csv"
    run_users(trained, 3).write_csv(path)  # each user's whole history: the state `embed` writes
    out = predict(trained, "panther", path).sort("user_id")
    scorer = Scorer(trained, "panther")
    seq = Sequences.load(scorer.run.sequences)
    ids = scorer.run.read_users()["user_id"].cast(pl.Utf8).to_list()
    states = {s.user_id: s for batch in user_states(scorer, seq, event_amounts(scorer, None, seq.n_events), ids,
                                                    None) for s in batch}
    for row in out.iter_rows(named=True):
        st = states[row["user_id"]]
        np.testing.assert_allclose(np.array(row["h"], np.float32), st.h, rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.array(row["pooled"], np.float32), st.pooled, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["markov", "personal"])
def test_count_models_give_the_next_token_only(trained, tmp_path, name):
    path = tmp_path / "ev.csv"
    pl.concat([run_users(trained, 2), new_users(trained)]).write_csv(path)
    out = predict(trained, name, path, top_k=5)
    assert out.height == 4 and "h" not in out.columns
    for p in out["top_p"].to_list():
        assert np.all(np.diff(p) <= 0) and sum(p) <= 1 + 1e-6


def test_cli_writes_parquet_and_prints_users(trained, tmp_path, capsys):
    path = tmp_path / "ev.csv"
    new_users(trained).write_csv(path)
    assert main(["predict", "--run", str(trained), "--model", "panther", "--events", str(path), "--top-k", "2",
                 "--out", str(tmp_path / "p.parquet")]) == 0
    text = capsys.readouterr().out
    assert "new-a (new user, 6 events, 3 UNK)" in text and "2. channel=" in text
    assert pl.read_parquet(tmp_path / "p.parquet").height == 2


def test_bad_inputs(trained, tmp_path):
    frame = run_users(trained, 1).with_columns(pl.col("amount").cast(pl.Utf8))
    bad = frame.with_columns(pl.when(pl.int_range(pl.len()) == 2).then(pl.lit("lots")).otherwise(pl.col("amount"))
                             .alias("amount"))
    bad.write_csv(tmp_path / "bad.csv")
    with pytest.raises(DataError, match=r"row 3, column 'amount'"):
        predict(trained, "panther", tmp_path / "bad.csv")
    frame.drop("channel").write_csv(tmp_path / "missing.csv")
    with pytest.raises(ConfigError, match="--top-k"):
        predict(trained, "panther", tmp_path / "missing.csv", top_k=0)
    error_line(cli("predict", "--run", trained, "--model", "panther", "--events", tmp_path / "missing.csv"),
               "missing.csv", "missing column", "'channel'")
    error_line(cli("predict", "--run", trained, "--model", "panther", "--events", tmp_path / "bad.csv"),
               "bad.csv", "row 3", "'amount'", "'lots'")


def test_unk_is_counted_like_prepare(trained, tmp_path):
    """The run's own events encode to the tokens prepare wrote (the same tokenizer, the same rules)."""
    from pantherseq.predict import encode_events, read_events
    from pantherseq.run import RunDir

    path = tmp_path / "ev.csv"
    run_users(trained, 3).write_csv(path)
    run = RunDir(trained)
    ev = encode_events(read_events(run, path), run.tokenizer())
    stored = pl.read_parquet(trained / "events.parquet").filter(pl.col("user_id").is_in(ev.user_ids))
    assert ev.tokens.tolist() == stored.sort("user_id", "timestamp", maintain_order=True)["token"].to_list()
    assert (ev.tokens == UNK).sum() == (stored["token"] == UNK).sum()


def test_label_and_event_id_columns_are_optional(tmp_path, handbook_csv):
    """A handbook run names label, scenario and event-id columns: a file without them is predicted; with
    them they are checked as prepare checks them."""
    from pantherseq.data.schema import load_dataset_config
    from pantherseq.prepare import prepare

    run = tmp_path / "hb"
    prepare(load_dataset_config("handbook", data=str(handbook_csv)), run)
    train(run, "markov", PretrainConfig(model=ModelConfig(max_len=8), train=TrainConfig(eval_max_users=None)))
    rows = [",".join(r.split(",")[1:5]) for r in handbook_rows(2, 5)]  # no id, no label, no scenario
    write_lines(tmp_path / "plain.csv", ["TX_DATETIME,CUSTOMER_ID,TERMINAL_ID,TX_AMOUNT", *rows])
    out = predict(run, "markov", tmp_path / "plain.csv", top_k=3)
    assert out["events"].to_list() == [5, 5] and out["known_user"].all()
    dup = handbook_rows(2, 5)
    dup[3] = "0," + dup[3].split(",", 1)[1]  # event id 0 twice
    write_lines(tmp_path / "dup.csv", [HANDBOOK_HEADER, *dup])
    with pytest.raises(DataError, match="duplicate event id"):
        predict(run, "markov", tmp_path / "dup.csv")
