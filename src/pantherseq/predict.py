"""`pantherseq predict`: the next behaviour and the user embedding for any users' event histories in a file
(issue 16: predictions for users outside the run, no split needed).

    predict(run, model, events, top_k=10) -> polars.DataFrame     one row per user of the file
    format_predictions(frame, n=5) -> str                         a few users, readable

Reading. The file is read and checked as `prepare` reads its source, with the run's config: the columns the
config names (the canonical names `user_id`, `timestamp` and the field names for the built-in simulator;
`user_id, item_id, rating, timestamp` in epoch seconds for MovieLens; the TabFormer layout for TabFormer),
the same bad-input rules (one error line naming file, row and column, or `bad_rows = "drop"`) and the same
duplicate-id check, ordering and time gaps (data/sources.py, prepare.py); the item fields come from the run's
copy of its item table (RUN/items.parquet), so the file needs only the item id. The label, scenario and event-id
columns are optional: read and checked when the file has them. No split: every event is
history; a user with one event is predicted too. Encoding uses the run's saved tokenizer: a value it never
saw is its field's UNK, an unseen combination the token UNK (`unk_events` counts them).

History. Each user's last max_len events are the model's window (and, for the copy head and `personal`,
up to `model.history` events before it), exactly the window serving keeps. Only the file's events count:
a user the run knows gets its profile row (`known_user`), but not its run history. A new user has an
unknown profile (zeros), as a cold-start user of the service.

Outputs, per user:
    user_id, known_user, events, unk_events, last_time
    top_tokens, top_labels, top_p   the K most likely next tokens (readable labels `field=value|...`) and
                                    their probabilities, over the regular tokens (the special ids are never
                                    candidates, as for serving: renormalised without them), sorted, sum ≤ 1;
                                    from the model's own scores (`target_scores`: the copy-head mixture when
                                    the model has one), so they rank as `evaluate` measures
    next_<field>, next_<field>_p    with field heads (`model.field_heads`): each field's most likely next
                                    value (its field UNK excluded) and its probability
    h, pooled                       neural models: the state after the last event and the mean state over
                                    the window, float32, computed as the service computes them
                                    (fraud/behaviour.py `final_states`: one float64 pass, rounded once)
Count models (markov, popular, personal) give the next-token columns only.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pantherseq.data.batch import Batch, collate
from pantherseq.data.dataset import Profile, gap_buckets
from pantherseq.data.schema import BOS, GAP, N_SPECIAL, TIME, UNK, USER, ColumnsConfig, DatasetConfig
from pantherseq.data.sources import load_source
from pantherseq.data.tables import resolve_files, scan_text
from pantherseq.errors import ConfigError, DataError
from pantherseq.fraud.behaviour import final_states, float64_copy
from pantherseq.model.base import NeuralModel, SequenceModel
from pantherseq.prepare import drop_duplicate_ids, order_events
from pantherseq.run import RunDir
from pantherseq.tokenizer import StructuredTokenizer
from pantherseq.train.checkpoint import load_model

log = logging.getLogger(__name__)
BATCH_USERS = 256


@dataclasses.dataclass
class FileEvents:
    """A file's events encoded with the run's tokenizer, user-major (CSR like data/sequences.py)."""

    user_ids: list[str]
    offsets: np.ndarray  # (U + 1,) int64
    tokens: np.ndarray  # (N,) int64
    codes: np.ndarray  # (N, F) int64
    gap_bucket: np.ndarray  # (N,) int64
    last_time: list


def _present(cfg: DatasetConfig, events: str | Path) -> ColumnsConfig:
    """The config's columns, without the label, scenario and event-id columns the file does not have (a
    prediction needs none of them; present, they are read and checked as `prepare` does)."""
    files = resolve_files(events, "--events")
    have = set(scan_text(files[0], cfg.format).collect_schema().names())
    c = cfg.columns
    return dataclasses.replace(c, **{k: None for k in ("label", "scenario", "event_id")
                                     if getattr(c, k) is not None and getattr(c, k) not in have})


def read_events(run: RunDir, events: str | Path) -> pl.DataFrame:
    """The file's canonical events, checked, ordered by user and time, with `gap_s` (see the module doc)."""
    cfg = run.config()
    cfg = dataclasses.replace(
        cfg, source="tabformer" if cfg.source == "tabformer" else "csv", data=str(events),
        columns=_present(cfg, events), profile=dataclasses.replace(cfg.profile, path=None),
        items=dataclasses.replace(cfg.items, path=str(run.items), separator=None) if cfg.items.fields else cfg.items,
        split=dataclasses.replace(cfg.split, min_events=1))
    loaded = load_source(cfg)
    dropped = dict(loaded.dropped)
    frame = order_events(drop_duplicate_ids(loaded.events, cfg.bad_rows, dropped), cfg, dropped)
    if frame.height == 0:
        raise DataError(f"{events}: no events left after dropping {dropped}")
    log.info("predict: %d rows read from %s, %d kept, dropped %s", loaded.rows_read, events, frame.height,
             dropped or "none")
    return frame


def encode_events(frame: pl.DataFrame, tok: StructuredTokenizer) -> FileEvents:
    enc = tok.transform(frame)
    users = frame.group_by(USER, maintain_order=True).agg(pl.len().alias("n"), pl.col(TIME).last().alias("t"))
    offsets = np.concatenate([[0], np.cumsum(users["n"].to_numpy())]).astype(np.int64)
    gap = frame[GAP].fill_null(float("nan")).to_numpy().astype(np.float32)  # as prepare stores it
    return FileEvents(users[USER].cast(pl.Utf8).to_list(), offsets, enc.tokens.astype(np.int64),
                      enc.codes.astype(np.int64), gap_buckets(gap), users["t"].to_list())


def window_batch(ev: FileEvents, rows: np.ndarray, max_len: int, history: int, profile: Profile,
                 user_idx: np.ndarray) -> tuple[Batch, np.ndarray]:
    """The Batch of the users `rows`' last max_len events (+ `history` before them) and their lengths; the
    one target is a placeholder at each window's last input, so `target_scores` scores the next event."""
    starts, ends = ev.offsets[rows], ev.offsets[rows + 1]
    w0 = np.maximum(starts, ends - max_len)
    lens = ends - w0
    known = user_idx[rows] >= 0
    pc = torch.zeros((len(rows), profile.cat.shape[1]), dtype=profile.cat.dtype)
    pn = torch.zeros((len(rows), profile.num.shape[1]), dtype=profile.num.dtype)
    if known.any():  # a new user's profile is unknown (zeros), as a cold start of the service
        pc[torch.from_numpy(known)] = profile.cat[user_idx[rows][known]]
        pn[torch.from_numpy(known)] = profile.num[user_idx[rows][known]]
    batch = collate(ev.tokens, ev.codes, ev.gap_bucket, w0, lens, rows, pc, pn,
                    torch.zeros(len(rows), len(rows), dtype=torch.bool), user_start=starts, history=history)
    targets = torch.zeros_like(batch.tokens)
    targets[torch.arange(len(rows)), torch.from_numpy(lens - 1)] = BOS
    return dataclasses.replace(batch, targets=targets, target_codes=None, target_repeat=None), lens


def next_distribution(model: SequenceModel, batch: Batch) -> torch.Tensor:
    """(B, V) probabilities of the next event over the regular tokens (specials 0, renormalised)."""
    scores, _ = model.target_scores(batch)
    p = model.probabilities(scores).double()
    p[:, :N_SPECIAL] = 0.0
    return (p / p.sum(1, keepdim=True).clamp_min(1e-300)).float()


def _field_columns(model: NeuralModel, h: torch.Tensor, tok: StructuredTokenizer) -> dict[str, list]:
    out: dict[str, list] = {}
    for f, logp in enumerate(model.field_log_probs(h) or []):
        p = logp.exp()
        p[:, 0] = 0.0  # the field's UNK is never a prediction
        top_p, top_c = p.max(dim=1)
        enc, name = tok.encoders[f], tok.field_names[f]
        out[f"next_{name}"] = [enc.label(int(c)) for c in top_c]
        out[f"next_{name}_p"] = top_p.tolist()
    return out


@torch.no_grad()
def predict(run: RunDir | str | Path, model: str, events: str | Path, top_k: int = 10,
            batch_users: int = BATCH_USERS) -> pl.DataFrame:
    """One row per user of `events` (see the module doc for the columns)."""
    run = RunDir.of(run).require()
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    net, _ = load_model(run, model)
    tok = run.tokenizer()
    ev = encode_events(read_events(run, events), tok)
    index = run.user_index()
    user_idx = np.array([index.get(u, -1) for u in ev.user_ids], dtype=np.int64)
    profile = Profile.of_run(run, len(index))
    neural = isinstance(net, NeuralModel)
    model64 = float64_copy(net) if neural else None
    k = min(top_k, tok.vocab_size - N_SPECIAL)
    labels: dict[int, str] = {}
    parts: list[dict[str, list]] = []
    for b in range(0, len(ev.user_ids), batch_users):
        rows = np.arange(b, min(b + batch_users, len(ev.user_ids)))
        batch, lens = window_batch(ev, rows, int(net.cfg.max_len), net.history_len, profile, user_idx)
        top_p, top_i = next_distribution(net, batch).topk(k, dim=1)
        part = {"top_tokens": top_i.tolist(), "top_p": top_p.tolist(),
                "top_labels": [[labels.setdefault(t, tok.token_label(t)) for t in r] for r in top_i.tolist()]}
        if neural:
            h, pooled = final_states(model64, batch, lens)
            part |= _field_columns(net, h, tok) | {"h": h.numpy().tolist(), "pooled": pooled.numpy().tolist()}
        parts.append(part)
    cols = {key: [v for p in parts for v in p[key]] for key in parts[0]}
    n = np.diff(ev.offsets)
    unk = np.add.reduceat((ev.tokens == UNK).astype(np.int64), ev.offsets[:-1])
    frame = pl.DataFrame({USER: ev.user_ids, "known_user": user_idx >= 0, "events": n, "unk_events": unk,
                          "last_time": ev.last_time})
    dims = {"top_tokens": pl.List(pl.Int32), "top_p": pl.List(pl.Float32), "top_labels": pl.List(pl.Utf8),
            "h": pl.List(pl.Float32), "pooled": pl.List(pl.Float32)}
    return frame.with_columns(pl.Series(key, val, dtype=dims.get(key)) for key, val in cols.items())


def format_predictions(frame: pl.DataFrame, n: int = 5, k: int = 3) -> str:
    """The first `n` users: their top-`k` next behaviours and the per-field predictions."""
    lines = []
    fields = [c for c in frame.columns if c.startswith("next_") and not c.endswith("_p")]
    for row in frame.head(n).iter_rows(named=True):
        who = "known" if row["known_user"] else "new"
        lines.append(f"  {row[USER]} ({who} user, {row['events']} events, {row['unk_events']} UNK):")
        for r, (label, p) in enumerate(zip(row["top_labels"][:k], row["top_p"][:k]), start=1):
            lines.append(f"    {r}. {label}  p={p:.4f}")
        if fields:
            lines.append("    " + "  ".join(f"{c[5:]}={row[c]} ({row[c + '_p']:.2f})" for c in fields))
    return "\n".join(lines)


__all__ = ["encode_events", "format_predictions", "predict", "read_events"]
