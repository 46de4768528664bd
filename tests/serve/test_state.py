"""The user-state byte format (serve/state.py): round trip, bad magic, damage, the first versions' names."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from pantherseq.serve.state import MAGIC, SCHEMA, StateFormatError, UserState, decode_event, encode_event


def full_state() -> UserState:
    rng = np.random.default_rng(0)
    return UserState(
        user_id="card-ü-1", user_idx=7, model_version="panther@abc", n_events=12, log_seq=3, last_time=1_700_000_000,
        refreshed_at=1_700_000_001.5, mu=1 / 300, sigma=0.01, tokens=rng.integers(4, 300, 5).astype(np.int32),
        codes=rng.integers(0, 9, (5, 3)).astype(np.int32), gap=np.array([0, 3, 4, 15, 1], np.int8),
        times=np.array([1, 2, 3], np.int64), amounts=np.array([0.1, 12.34, 1e6]),
        h=rng.normal(size=8).astype(np.float32), pooled=rng.normal(size=8).astype(np.float32),
        top_ids=np.array([9, 4], np.int32), top_p=np.array([0.5, 0.25], np.float32),
        recent_delta=np.array([[1.5, np.nan], [0.25, 3.0]], np.float32), pred=rng.normal(size=6))


def test_round_trip_keeps_every_field_and_dtype():
    s = full_state()
    back = UserState.decode(s.encode())
    for name, value in s.__dict__.items():
        got = getattr(back, name)
        if isinstance(value, np.ndarray):
            assert got.dtype == value.dtype and np.array_equal(got, value, equal_nan=True), name
        else:
            assert got == value, name


@pytest.mark.parametrize("blob", [b"", b"PSX\x01\x00\x00\x00\x00", b"not a state at all", b"\x00" * 64])
def test_bad_magic_is_a_state_format_error(blob):
    with pytest.raises(StateFormatError, match="bad magic"):
        UserState.decode(blob)


def test_another_schema_says_re_run_embed():
    blob = bytearray(full_state().encode())
    blob[3] = SCHEMA + 1
    with pytest.raises(StateFormatError, match="re-run embed"):
        UserState.decode(bytes(blob))


@pytest.mark.parametrize("cut", [9, 40, -1, -17])
def test_a_truncated_or_damaged_state_is_a_state_format_error(cut):
    blob = full_state().encode()
    with pytest.raises(StateFormatError):
        UserState.decode(blob[:cut])
    header_garbage = blob[:8] + b"}" + blob[9:]
    with pytest.raises(StateFormatError):
        UserState.decode(header_garbage)


def test_states_written_with_the_first_versions_name_e_u_still_decode():
    s = full_state()
    head = {"scalars": {k: v for k, v in s.__dict__.items() if not isinstance(v, np.ndarray)},
            "arrays": [["h", "<f4", [8]], ["e_u", "<f4", [8]]]}
    raw = json.dumps(head).encode()
    blob = MAGIC + bytes([SCHEMA]) + struct.pack("<I", len(raw)) + raw + s.h.tobytes() + s.pooled.tobytes()
    back = UserState.decode(blob)
    assert np.array_equal(back.pooled, s.pooled) and np.array_equal(back.h, s.h)


def test_older_states_still_decode_without_recent_delta_and_pred():
    """Schema 2 added `recent_delta`, schema 3 `pred`; a schema-1 state (neither) decodes with both empty
    (the scorer then computes the prediction from h: tests/serve/test_service.py)."""
    s = full_state()
    head = {"scalars": {k: v for k, v in s.__dict__.items() if not isinstance(v, np.ndarray)},
            "arrays": [["h", "<f4", [8]]]}
    raw = json.dumps(head).encode()
    back = UserState.decode(MAGIC + bytes([1]) + struct.pack("<I", len(raw)) + raw + s.h.tobytes())
    assert back.recent_delta.shape == (0, 0) and back.pred.shape == (0,) and np.array_equal(back.h, s.h)
    assert SCHEMA == 3


def test_logged_events_carry_their_window_deltas():
    rec = {"time": 5, "fields": {"amount": 1.0}, "token": 9, "codes": [1, 2], "gap": 0, "window": [1.5, float("nan")]}
    back = decode_event(encode_event(rec))
    assert back["window"][0] == 1.5 and np.isnan(back["window"][1])
    old = {k: v for k, v in rec.items() if k != "window"}  # logged before schema 2
    assert "window" not in decode_event(encode_event(old))
    with pytest.raises(StateFormatError):
        decode_event(encode_event({**rec, "window": ["x"]}))
