"""Typed configs: built-ins load, unknown keys and wrong types are named, overrides apply."""

from __future__ import annotations

import pytest

from pantherseq.config import apply_overrides, load_toml, save_toml
from pantherseq.data.schema import DATASETS, DatasetConfig, load_dataset_config
from pantherseq.errors import ConfigError


@pytest.mark.parametrize("name", [d for d in DATASETS if d != "csv"])
def test_builtin_configs_load_and_round_trip(name, tmp_path):
    cfg = load_dataset_config(name)
    assert isinstance(cfg, DatasetConfig) and cfg.source == name and cfg.tokenizer.fields
    save_toml(cfg, tmp_path / "c.toml")
    again = load_dataset_config("csv", tmp_path / "c.toml")
    assert again == cfg


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) top_kk; valid keys: fields, top_k"):
        load_dataset_config("handbook", overrides=["tokenizer.top_kk=3"])


@pytest.mark.parametrize("override,words", [
    ("tokenizer.top_k=many", "expected int"),
    ("split.kind=random", "not one of"),
    ("tokenizer.fields=['nope']", "are not fields"),
    ("split.t1=yesterday", "Invalid isoformat"),
    ("fields=[{name='x', kind='time'}]", "needs derive"),
    ("contrastive.planet=0", "not profile fields"),
])
def test_bad_values_are_named(override, words):
    with pytest.raises(ConfigError, match=words):
        load_dataset_config("simulated", overrides=[override])


def test_overrides_parse_toml_values():
    data = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=\"x\"", "d=[1, 2]", "e=word"])
    assert data == {"a": {"b": 2, "c": "x"}, "d": [1, 2], "e": "word"}
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["novalue"])


def test_csv_needs_a_config_and_files_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="needs --config"):
        load_dataset_config("csv")
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("x = = 1")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_toml(tmp_path / "bad.toml")
