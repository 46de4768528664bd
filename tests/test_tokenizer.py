"""StructuredTokenizer: fit on training events, Cartesian product, top-K + UNK, round-trip, one event."""

from __future__ import annotations

import datetime as dt
import functools
import json

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_frame
from pantherseq.data.schema import FieldConfig
from pantherseq.errors import DataError
from pantherseq.tokenizer import BOS, N_SPECIAL, PAD, UNK, StructuredTokenizer

FIELDS = [
    FieldConfig("amount", kind="numeric", bins=4),
    FieldConfig("channel"),
    FieldConfig("category"),
    FieldConfig("hour", kind="time", derive="hour", bins=4),
    FieldConfig("weekday", kind="time", derive="weekday"),
    FieldConfig("log_gap", kind="time", derive="log_gap", bins=3),
]


def make(top_k: int = 1000, token_fields=("channel", "amount", "category")) -> StructuredTokenizer:
    return StructuredTokenizer(FIELDS, list(token_fields), top_k)


def test_special_tokens_are_fixed():
    assert (PAD, UNK, BOS) == (0, 1, 2) and N_SPECIAL == 4


def test_fit_builds_the_cartesian_product_most_frequent_first(tiny_events):
    tok = make().fit(tiny_events)
    enc = tok.transform(tiny_events)
    assert enc.tokens.dtype == np.int32 and enc.codes.shape == (tiny_events.height, len(FIELDS))
    assert enc.tokens.min() >= N_SPECIAL  # everything seen in training is covered
    # the vocabulary is exactly the distinct (channel, amount bucket, category) combinations
    combos = {tuple(r) for r in enc.codes[:, [1, 0, 2]].tolist()}
    assert tok.vocab_size == N_SPECIAL + len(combos) == N_SPECIAL + tok.stats["raw_combinations"]
    assert list(tok.counts) == sorted(tok.counts, reverse=True)
    # token 4 is the most frequent combination
    ids, counts = np.unique(enc.tokens, return_counts=True)
    assert ids[np.argmax(counts)] == N_SPECIAL


def test_top_k_sends_the_rest_to_unk(tiny_events):
    tok = make(top_k=3).fit(tiny_events)
    enc = tok.transform(tiny_events)
    assert tok.vocab_size == N_SPECIAL + 3
    kept = np.isin(enc.tokens, [4, 5, 6])
    assert np.all(enc.tokens[~kept] == UNK)
    assert tok.coverage(enc.tokens) == pytest.approx(kept.mean())
    assert tok.coverage(enc.tokens) == pytest.approx(tok.stats["train_coverage"])


def test_unknown_values_become_unk_and_field_code_zero(tiny_events):
    tok = make().fit(tiny_events)
    new = tiny_events.head(2).with_columns(pl.Series("channel", ["teleport", None]))
    enc = tok.transform(new)
    assert enc.tokens.tolist() == [UNK, UNK]
    assert enc.codes[:, 1].tolist() == [0, 0]  # channel's own UNK code
    assert enc.codes[0, 2] != 0  # the other fields are still known: an UNK event keeps its category
    one = {"amount": 5.0, "channel": "teleport", "category": "fuel", "timestamp": dt.datetime(2024, 1, 1)}
    assert tok.transform_one(one) == UNK


def test_buckets_are_fitted_on_the_training_events_only(tiny_events):
    tok = make().fit(tiny_events)
    edges = list(tok.encoders[0].edges)
    shifted = tiny_events.with_columns(pl.col("amount") * 1000)
    tok.transform(shifted)
    assert tok.encoders[0].edges == edges  # transform never refits
    assert len(edges) == 3  # 4 quantile bins
    assert np.quantile(tiny_events["amount"].to_numpy(), 0.5) == pytest.approx(edges[1], rel=1e-6)


def test_log_quantile_gives_tail_resolution():
    x = np.concatenate([np.full(990, 20.0) + np.arange(990) % 30, np.geomspace(100, 10_000, 10)])
    frame = pl.DataFrame({"amount": x})
    q = StructuredTokenizer([FieldConfig("amount", kind="numeric", bins=10)], ["amount"]).fit(frame)
    lq = StructuredTokenizer([FieldConfig("amount", kind="numeric", bins=10, bucketing="log_quantile")],
                             ["amount"]).fit(frame)
    big = pl.DataFrame({"amount": [500.0, 5000.0]})
    # equal-frequency bins lump both tail values together; log bins separate them
    assert len(set(q.transform(big).codes[:, 0])) == 1
    assert len(set(lq.transform(big).codes[:, 0])) == 2


def test_time_fields_decode_readably(tiny_events):
    tok = make(token_fields=("hour", "weekday", "log_gap")).fit(tiny_events)
    labels = tok.token_labels()
    assert labels[:4] == ["[PAD]", "[UNK]", "[BOS]", "[PROFILE]"]
    first = tok.decode(N_SPECIAL)
    assert set(first) == {"hour", "weekday", "log_gap"}
    assert first["weekday"] in {"Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"}
    assert first["hour"].endswith("h") and "-" in first["hour"]
    # the first event of each user has no gap: log_gap code 0, labelled "first"
    enc = tok.transform(tiny_events)
    assert enc.codes[0, 5] == 0 and tok.encoders[5].label(0) == "first"


def test_save_load_round_trip(tiny_events, tmp_path):
    tok = make(top_k=20).fit(tiny_events)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    data = json.loads(path.read_text())  # human-readable: labels and values in plain JSON
    assert data["tokens"][0]["label"] == tok.token_label(N_SPECIAL)
    back = StructuredTokenizer.load(path)
    a, b = tok.transform(tiny_events), back.transform(tiny_events)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.codes, b.codes)
    assert back.token_labels() == tok.token_labels() and back.stats == tok.stats
    back.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == path.read_text()


def test_fit_on_no_events_is_a_clear_error(tiny_events):
    with pytest.raises(DataError, match="no events"):
        make().fit(tiny_events.head(0))


@settings(max_examples=60, deadline=None)
@given(
    amount=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=64)),
    channel=st.one_of(st.none(), st.sampled_from(["chip", "online", "swipe", "new"])),
    category=st.sampled_from(["grocery", "fuel", "coffee", "travel", "zzz"]),
    minutes=st.integers(0, 60 * 24 * 60),
    gap=st.one_of(st.none(), st.floats(0, 1e7)),
)
def test_transform_one_matches_the_vectorised_transform(amount, channel, category, minutes, gap):
    tok = _fitted()
    ts = dt.datetime(2024, 1, 1) + dt.timedelta(minutes=minutes)
    event = {"amount": amount, "channel": channel, "category": category, "timestamp": ts, "gap_s": gap}
    frame = pl.DataFrame([event], schema={"amount": pl.Float64, "channel": pl.Utf8, "category": pl.Utf8,
                                          "timestamp": pl.Datetime("us"), "gap_s": pl.Float64})
    enc = tok.transform(frame)
    token, codes = tok.encode_one(event)
    assert token == enc.tokens[0] and codes == enc.codes[0].tolist()


@functools.cache
def _fitted() -> StructuredTokenizer:
    return make(token_fields=("channel", "amount", "category", "hour")).fit(tiny_frame())
