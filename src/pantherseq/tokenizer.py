"""StructuredTokenizer (paper §3.2): one token per event from the Cartesian product of chosen fields.

Each field is encoded to a small integer code (`encoders.py`, fitted on the training period only). The
codes of the token fields are combined in a mixed radix into one integer key; the `top_k` most frequent
keys of the training period become the vocabulary (ids from `N_SPECIAL` on, most frequent first) and
every other combination maps to UNK. The per-field codes of *all* fields are returned too, so a model
can embed fields separately and an UNK event still carries its amount, channel and category.

    tok = StructuredTokenizer.from_config(cfg)      # cfg: schema.DatasetConfig
    tok.fit(train_events)                            # canonical frame (+ gap_s when a log_gap field)
    enc = tok.transform(events)                      # enc.tokens (N,) int32, enc.codes (N, F) int32
    tok.transform_one({"amount": 12.5, "timestamp": dt, ...})   # one event, microseconds
    tok.decode(token_id) -> {"amount": "[10, 15)", "mcc": "5411"}
    tok.save(path); StructuredTokenizer.load(path)   # human-readable JSON, round-trips
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pantherseq.config import build_config, to_dict
from pantherseq.data.schema import BOS, N_SPECIAL, PAD, PROFILE, SPECIAL_TOKENS, UNK, FieldConfig
from pantherseq.encoders import FieldEncoder, build_encoder
from pantherseq.errors import ConfigError, DataError

__all__ = ["BOS", "N_SPECIAL", "PAD", "PROFILE", "SPECIAL_TOKENS", "UNK", "Encoded", "StructuredTokenizer"]
FORMAT_VERSION = 1
LUT_MAX = 1 << 23  # key spaces up to 8M combinations get a dense lookup table (32 MB at most)


@dataclass
class Encoded:
    """Vectorised transform output: tokens (N,) int32 and per-field codes (N, F) int32 (0 = field UNK)."""

    tokens: np.ndarray
    codes: np.ndarray


class StructuredTokenizer:
    def __init__(self, fields: list[FieldConfig], token_fields: list[str], top_k: int = 60_000):
        names = [f.name for f in fields]
        missing = [n for n in token_fields if n not in names]
        if missing or not token_fields:
            raise ConfigError(f"token fields {missing or token_fields} must be among the fields {names}")
        self.fields = list(fields)
        self.token_fields = list(token_fields)
        self.top_k = int(top_k)
        self.encoders: list[FieldEncoder] = [build_encoder(f) for f in self.fields]
        self._token_idx = [names.index(n) for n in self.token_fields]
        self.keys = np.zeros(0, dtype=np.int64)  # kept keys, in token-id order
        self.counts = np.zeros(0, dtype=np.int64)  # training frequency of each kept key
        self.stats: dict[str, Any] = {}
        self._sorted_keys = np.zeros(0, dtype=np.int64)
        self._sorted_ids = np.zeros(0, dtype=np.int32)
        self._key_to_id: dict[int, int] = {}
        self._lut: np.ndarray | None = None  # dense key -> id table when the key space is small
        self._radix_vals: list[int] = []  # mixed-radix place values of the token fields (set by fit/load)

    @classmethod
    def from_config(cls, cfg: Any) -> StructuredTokenizer:
        return cls(cfg.fields, cfg.tokenizer.fields, cfg.tokenizer.top_k)

    # -- sizes -------------------------------------------------------------------------------
    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def field_sizes(self) -> list[int]:
        """Codes per field, 0 (the field's UNK) included: the embedding table sizes."""
        return [e.size for e in self.encoders]

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + len(self.keys)

    def _radix(self) -> np.ndarray:
        sizes = [self.encoders[i].size for i in self._token_idx]
        if float(np.prod(np.asarray(sizes, dtype=np.float64))) >= 2.0**62:
            raise ConfigError(f"the product of token field sizes {sizes} overflows 64 bits: use fewer "
                              "values (max_values) or bins")
        radix = np.ones(len(sizes), dtype=np.int64)
        for j in range(len(sizes) - 2, -1, -1):
            radix[j] = radix[j + 1] * sizes[j + 1]
        return radix

    # -- fit / transform ---------------------------------------------------------------------
    def field_codes(self, frame: pl.DataFrame) -> np.ndarray:
        """(N, F) int32 codes of every field."""
        cols = [enc.codes(frame) for enc in self.encoders]
        return np.stack(cols, axis=1) if cols else np.zeros((frame.height, 0), np.int32)

    def _keys(self, codes: np.ndarray) -> np.ndarray:
        radix = self._radix_vals
        keys = codes[:, self._token_idx[0]].astype(np.int64) * radix[0]
        for j, r in zip(self._token_idx[1:], radix[1:]):
            keys += codes[:, j].astype(np.int64) * r
        return keys

    def fit(self, frame: pl.DataFrame) -> StructuredTokenizer:
        if frame.height == 0:
            raise DataError("cannot fit the tokenizer: the training period has no events")
        for enc in self.encoders:
            enc.fit(frame)
        self.encoders_fitted()
        keys, counts = np.unique(self.keys_of(self.field_codes(frame)), return_counts=True)
        return self.fit_vocab(keys, counts)

    def encoders_fitted(self) -> StructuredTokenizer:
        """Call once every encoder is fitted (by `fit`, or from statistics): fixes the token key radix."""
        self._radix_vals = [int(r) for r in self._radix()]
        return self

    def keys_of(self, codes: np.ndarray) -> np.ndarray:
        """(N,) int64 mixed-radix token keys of (N, F) field codes (needs `encoders_fitted`)."""
        return self._keys(codes)

    def fit_vocab(self, keys: np.ndarray, counts: np.ndarray) -> StructuredTokenizer:
        """Fit the vocabulary from every distinct training key and its count (any order; engine-neutral)."""
        keys, counts = np.asarray(keys, dtype=np.int64), np.asarray(counts, dtype=np.int64)
        if keys.size == 0:
            raise DataError("cannot fit the tokenizer: the training period has no events")
        order = np.lexsort((keys, -counts))  # most frequent first, ties by key: deterministic
        keys, counts = keys[order], counts[order]
        cum = np.cumsum(counts) / counts.sum()
        self.stats = {
            "train_events": int(counts.sum()),
            "raw_combinations": int(keys.size),
            "train_coverage": float(cum[min(self.top_k, keys.size) - 1]),
            "coverage_curve": _coverage_curve(cum),
            "k_for_95pct": int(np.searchsorted(cum, 0.95 - 1e-12) + 1),
            "k_for_96pct": int(np.searchsorted(cum, 0.96 - 1e-12) + 1),
            "k_for_99pct": int(np.searchsorted(cum, 0.99 - 1e-12) + 1),
        }
        self._set_vocab(keys[: self.top_k], counts[: self.top_k])
        return self

    def _set_vocab(self, keys: np.ndarray, counts: np.ndarray) -> None:
        self.keys = np.asarray(keys, dtype=np.int64)
        self.counts = np.asarray(counts, dtype=np.int64)
        order = np.argsort(self.keys, kind="stable")
        self._sorted_keys = self.keys[order]
        self._sorted_ids = (order + N_SPECIAL).astype(np.int32)
        self._key_to_id = {int(k): i + N_SPECIAL for i, k in enumerate(self.keys.tolist())}
        space = int(np.prod([self.encoders[i].size for i in self._token_idx], dtype=np.float64))
        self._lut = None
        if space <= LUT_MAX:
            self._lut = np.full(space, UNK, dtype=np.int32)
            self._lut[self.keys] = np.arange(N_SPECIAL, N_SPECIAL + len(self.keys), dtype=np.int32)

    def tokens_from_codes(self, codes: np.ndarray) -> np.ndarray:
        keys = self._keys(codes)
        if self._lut is not None:
            return self._lut[keys]
        pos = np.searchsorted(self._sorted_keys, keys)
        pos = np.minimum(pos, max(len(self._sorted_keys) - 1, 0))
        if len(self._sorted_keys) == 0:
            return np.full(len(keys), UNK, dtype=np.int32)
        hit = self._sorted_keys[pos] == keys
        return np.where(hit, self._sorted_ids[pos], UNK).astype(np.int32)

    def transform(self, frame: pl.DataFrame) -> Encoded:
        codes = self.field_codes(frame)
        return Encoded(tokens=self.tokens_from_codes(codes), codes=codes)

    def encode_one(self, event: dict[str, Any]) -> tuple[int, list[int]]:
        """One event (field values + `timestamp`, + `gap_s` if used) -> (token id, per-field codes)."""
        codes = [enc.code_one(event) for enc in self.encoders]
        key = 0
        for i, r in zip(self._token_idx, self._radix_vals):
            key += codes[i] * r
        return self._key_to_id.get(key, UNK), codes

    def transform_one(self, event: dict[str, Any]) -> int:
        return self.encode_one(event)[0]

    # -- decode ------------------------------------------------------------------------------
    def token_codes(self, token: int) -> list[int]:
        """The token-field codes of a regular token."""
        key = int(self.keys[token - N_SPECIAL])
        out = []
        for r in self._radix_vals:
            out.append(key // r)
            key %= r
        return out

    def decode(self, token: int) -> dict[str, str]:
        """Token id -> readable value of each token field ({"token": "[UNK]"} for specials)."""
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id {token} out of range [0, {self.vocab_size})")
        if token < N_SPECIAL:
            return {"token": SPECIAL_TOKENS[token]}
        codes = self.token_codes(token)
        return {n: self.encoders[i].label(c) for n, i, c in zip(self.token_fields, self._token_idx, codes)}

    def token_label(self, token: int) -> str:
        parts = self.decode(token)
        return "|".join(f"{k}={v}" for k, v in parts.items()) if token >= N_SPECIAL else parts["token"]

    def token_labels(self) -> list[str]:
        """Readable label of every token id (reports and the serving explanation use it)."""
        return [self.token_label(t) for t in range(self.vocab_size)]

    def coverage(self, tokens: np.ndarray) -> float:
        """Fraction of events whose token is not UNK."""
        return float(np.mean(tokens != UNK)) if len(tokens) else 0.0

    # -- persistence -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "special_tokens": list(SPECIAL_TOKENS),
            "top_k": self.top_k,
            "token_fields": self.token_fields,
            "fields": [{"config": to_dict(f), **enc.state()} for f, enc in zip(self.fields, self.encoders)],
            "stats": self.stats,
            "vocab_size": self.vocab_size,
            "tokens": [
                {"id": i + N_SPECIAL, "codes": self.token_codes(i + N_SPECIAL),
                 "label": self.token_label(i + N_SPECIAL), "count": int(c)}
                for i, c in enumerate(self.counts.tolist())
            ],
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StructuredTokenizer:
        if data.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"tokenizer format {data.get('format_version')} is not {FORMAT_VERSION}")
        fields = [build_config(FieldConfig, f["config"], "tokenizer.fields") for f in data["fields"]]
        tok = cls(fields, data["token_fields"], data["top_k"])
        for enc, state in zip(tok.encoders, data["fields"]):
            enc.load_state(state)
        radix = tok._radix_vals = [int(r) for r in tok._radix()]
        keys = [sum(c * r for c, r in zip(t["codes"], radix)) for t in data["tokens"]]
        tok._set_vocab(np.asarray(keys, dtype=np.int64), np.asarray([t["count"] for t in data["tokens"]]))
        tok.stats = data.get("stats", {})
        return tok

    @classmethod
    def load(cls, path: str | Path) -> StructuredTokenizer:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read tokenizer {path}: {exc}") from None
        return cls.from_json(data)


def _coverage_curve(cum: np.ndarray) -> list[list[float]]:
    """[K, training coverage at K] at roughly log-spaced K up to the number of raw combinations."""
    n = cum.size
    ks = sorted({int(k) for k in np.unique(np.geomspace(1, n, num=min(n, 40)).round())} | {n})
    return [[k, round(float(cum[k - 1]), 6)] for k in ks]
