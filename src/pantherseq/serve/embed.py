"""`pantherseq embed`: every user's serving state (serve/state.py) as of a cut-off, written to a store.

For each user with events before `until` (default: after the last event): the last max_len events (the
model's window), the events of the last `spend_days` days (customer spending), and the model's prediction
after the last event (h, the pooled state, top-k, μ, σ) from one batched forward pass per `batch_size` users, with a
progress bar; and the short-window Δ of each user's last max(WINDOW_SIZES) − 1 events (`recent_delta`), each
from its own history in the fraud pass's windows (`recent_deltas`: the same `behaviour_features` as
`pantherseq fraud`, so the served window means equal the offline ones). Shard by shard (`shard_states`): one
memory-mapped shard, its users' amounts and ids and their Δ at a time, never the merged run. The store's
meta `embed` records the run, model version, cut-off and count; the service reads it at start-up to rebuild
the terminal history up to the same cut-off. A store that belongs to another run is refused, one of another
model version of this run unless `migrate` (identity.py); the store's `owner` record then names this run and
model.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import numpy as np
import polars as pl
from tqdm import tqdm

from pantherseq.data.dataset import RunData, gap_buckets
from pantherseq.data.schema import DAY
from pantherseq.data.sequences import Sequences, load_shard, shard_count
from pantherseq.errors import ConfigError
from pantherseq.fraud.behaviour import behaviour_features
from pantherseq.fraud.personal import WINDOW_SIZES
from pantherseq.prepare import USER_IDX
from pantherseq.serve.identity import check_owner, write_owner
from pantherseq.serve.scorer import Scorer, parse_time
from pantherseq.serve.state import SCHEMA, UserState
from pantherseq.store import Store

log = logging.getLogger(__name__)


def window_ends(seq: Sequences, cut_s: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) rows of each user's events before `cut_s` (unix s; None = all of them)."""
    times = np.asarray(seq.time)
    offsets = np.asarray(seq.offsets).astype(np.int64)
    starts = offsets[:-1]
    ends = offsets[1:] if cut_s is None else np.array(
        [s + int(np.searchsorted(times[s:e], cut_s, side="left")) for s, e in zip(starts, offsets[1:])],
        dtype=np.int64)
    return starts, ends


def event_amounts(scorer: Scorer, frame: pl.DataFrame | None, n: int) -> np.ndarray:
    """(n,) float64 amounts of the events in `frame` (events.parquet rows; zeros without an amount field)."""
    if frame is None or scorer.amount_field not in scorer.kinds:
        return np.zeros(n)
    return frame[scorer.amount_field].cast(pl.Float64).fill_null(0.0).to_numpy()


def recent_deltas(scorer: Scorer, cut_s: int | None, data: RunData) -> np.ndarray:
    """(E, S) float32 over the events of `data` (`RunData.of_sequences`: a shard, or some of its users): the
    short-window Δ (`DeviationVocab.window_base`) of each user's last
    max(WINDOW_SIZES) − 1 events before `cut_s`, NaN elsewhere; from `behaviour_features` with the fraud
    config's `context`, so each equals the offline value of that event (each user's from its own history)."""
    starts, ends = window_ends(data.seq, cut_s)
    m = max(WINDOW_SIZES) - 1
    want = np.zeros(data.seq.n_events + 1, np.int64)
    np.add.at(want, np.maximum(starts, ends - m), 1)
    np.add.at(want, ends, -1)
    bf = behaviour_features(scorer.model, data, np.cumsum(want)[:-1] > 0, scorer.context, lookback=0)
    base = scorer.vocab.window_base
    out = np.full((data.seq.n_events, len(base)), np.nan, np.float32)
    if len(bf.index):
        out[bf.index] = np.stack([bf.delta[n] for n in base], 1)
    return out


def user_states(scorer: Scorer, seq: Sequences, amounts: np.ndarray, user_ids: list[str], cut_s: int | None,
                batch_size: int = 256, progress: bool = False, now: float | None = None,
                recent: np.ndarray | None = None) -> Iterator[list[UserState]]:
    """Batches of refreshed states of `seq`'s users with events before `cut_s`. `seq` may be a shard: its
    `users` (global indices) become the states' user_idx; `amounts`, `recent` (`recent_deltas`; None = not
    computed: the states get none) and `user_ids` are aligned with its rows and users. One batched float64
    forward pass (`Scorer.refresh`) per `batch_size` users."""
    starts, ends = window_ends(seq, cut_s)
    times = np.asarray(seq.time)
    glob = np.arange(seq.n_users) if seq.users is None else np.asarray(seq.users)
    gap_b = gap_buckets(np.asarray(seq.gap, dtype=np.float64))
    tokens, codes = np.asarray(seq.tokens), np.asarray(seq.codes)
    todo = np.flatnonzero(ends > starts)
    L = scorer.max_len
    for b in tqdm(range(0, len(todo), batch_size), desc="embed", unit="batch", disable=not progress):
        states = []
        for u in todo[b:b + batch_size].tolist():
            s, e = int(starts[u]), int(ends[u])
            w0 = max(s, e - L)
            t_last = int(times[e - 1])
            m0 = s + int(np.searchsorted(times[s:e], t_last - scorer.spend_days * DAY, side="right"))
            states.append(UserState(
                user_id=user_ids[u], user_idx=int(glob[u]), model_version=scorer.model_version, n_events=e - s,
                last_time=t_last, tokens=tokens[w0:e].astype(np.int32), codes=codes[w0:e].astype(np.int32),
                gap=gap_b[w0:e].astype(np.int8), times=times[m0:e].astype(np.int64),
                amounts=amounts[m0:e].astype(np.float64),
                recent_delta=(recent[max(s, e - max(WINDOW_SIZES) + 1):e] if recent is not None
                              else np.zeros((0, len(scorer.vocab.window_base)), np.float32))))
        yield scorer.refresh(states, time.time() if now is None else now, incremental=False)


def shard_amounts(scorer: Scorer, seq: Sequences) -> np.ndarray:
    """The amounts of `seq`'s rows (the users of a shard, or some of them: global indices in `seq.users`),
    read from events.parquet by user index (only those users' rows are held)."""
    if scorer.amount_field not in scorer.kinds:
        return np.zeros(seq.n_events)
    users = np.asarray(seq.users)
    frame = (pl.scan_parquet(scorer.run.events).select(USER_IDX, scorer.amount_field)
             .filter(pl.col(USER_IDX).is_in(users.tolist())).collect())
    # events.parquet is user-major and chronological, as the sequences are: keep its order within a user
    frame = frame.with_row_index("_row").sort(USER_IDX, "_row")
    if frame.height != seq.n_events:
        raise ConfigError(f"{scorer.run.events} and the sequences disagree on users {users[:3].tolist()}...")
    return event_amounts(scorer, frame, seq.n_events)


def shard_user_ids(scorer: Scorer, users: np.ndarray) -> list[str]:
    """The user ids of global user indices `users` (users.parquet)."""
    frame = pl.scan_parquet(scorer.run.users).select(USER_IDX, "user_id") \
        .filter(pl.col(USER_IDX).is_in(np.asarray(users).tolist())).collect()
    names = dict(zip(frame[USER_IDX].to_list(), frame["user_id"].cast(pl.Utf8).to_list()))
    return [names[int(u)] for u in users]


def shard_states(scorer: Scorer, seq: Sequences, cut_s: int | None, batch_size: int = 256, progress: bool = False,
                 now: float | None = None) -> Iterator[list[UserState]]:
    """`user_states` of the users of `seq` (a shard, or some of its users: `load_shard`, `take_users`) with
    their amounts, ids and `recent_deltas` read for them alone: what one Spark task and each step of the
    single-process `embed_users` compute, so neither holds more than one shard."""
    data = RunData.of_sequences(scorer.run, seq, scorer.profile, scorer.tok)
    recent = recent_deltas(scorer, cut_s, data)
    yield from user_states(scorer, seq, shard_amounts(scorer, seq), shard_user_ids(scorer, np.asarray(seq.users)),
                           cut_s, batch_size, progress, now=now, recent=recent)


def embed_meta(scorer: Scorer, until: str | None, n_written: int, seconds: float, **extra) -> dict:
    """The store's `embed` meta record (what the service reads at start-up)."""
    cut_s = parse_time(until)[0] if until else None
    return {"run": str(scorer.run.path.resolve()), "run_id": scorer.run_id, "model": scorer.model_name,
            "model_version": scorer.model_version,
            "until": until, "until_s": cut_s, "users": n_written, "max_len": scorer.max_len,
            "spend_days": scorer.spend_days, "state_schema": SCHEMA, "seconds": round(seconds, 2), **extra}


def finish_embed(store: Store, scorer: Scorer, meta: dict) -> None:
    """Record the `embed` meta and claim the store for this run and model (identity.py)."""
    store.put_meta("embed", json.dumps(meta).encode())
    write_owner(store, scorer.run_id, scorer.model_version)


def embed_users(scorer: Scorer, store: Store, until: str | None = None, batch_size: int = 256,
                progress: bool = True, migrate: bool = False) -> dict:
    """Write the state of every user with history before `until` (ISO time) to `store`; returns the meta."""
    started = time.perf_counter()
    check_owner(store, scorer.run_id, scorer.model_version, migrate)  # ConfigError: another run / model
    cut_s = parse_time(until)[0] if until else None
    folder, n_written = scorer.run.sequences, 0
    for shard in range(shard_count(folder)):  # one shard in memory at a time (memory-mapped)
        for states in shard_states(scorer, load_shard(folder, shard), cut_s, batch_size, progress):
            store.put_many({s.user_id: s.encode() for s in states})
            n_written += len(states)
    meta = embed_meta(scorer, until, n_written, time.perf_counter() - started)
    finish_embed(store, scorer, meta)
    log.info("embedded %d users in %.1f s", n_written, meta["seconds"])
    return meta


__all__ = ["embed_meta", "embed_users", "event_amounts", "finish_embed", "recent_deltas", "shard_amounts",
           "shard_states", "shard_user_ids", "user_states", "window_ends"]
