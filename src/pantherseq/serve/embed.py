"""`pantherseq embed`: every user's serving state (serve/state.py) as of a cut-off, written to a store.

For each user with events before `until` (default: after the last event): the last max_len events (the
model's window), the events of the last `spend_days` days (customer spending), and the model's prediction
after the last event (h, e_u, top-k, μ, σ) from one batched forward pass per `batch_size` users, with a
progress bar. The store's meta `embed` records the run, model version, cut-off and count; the service
reads it at start-up to rebuild the terminal history up to the same cut-off.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from pantherseq.data.dataset import gap_buckets
from pantherseq.data.sequences import Sequences
from pantherseq.fraud.features import DAY
from pantherseq.serve.online import OnlineModel, parse_time
from pantherseq.serve.state import UserState
from pantherseq.store import Store

log = logging.getLogger(__name__)


def embed_users(om: OnlineModel, store: Store, until: str | None = None, batch_size: int = 256,
                progress: bool = True) -> dict:
    """Write the state of every user with history before `until` (ISO time) to `store`; returns the meta."""
    started = time.perf_counter()
    seq = Sequences.load(om.run / "sequences")
    cut_s = parse_time(until)[0] if until else None
    times = np.asarray(seq.time)
    offsets = np.asarray(seq.offsets).astype(np.int64)
    starts = offsets[:-1]
    ends = offsets[1:] if cut_s is None else np.array(
        [s + int(np.searchsorted(times[s:e], cut_s, side="left")) for s, e in zip(starts, offsets[1:])])
    amounts = pl.read_parquet(om.run / "events.parquet", columns=[om.amount_field])[om.amount_field] \
        .cast(pl.Float64).fill_null(0.0).to_numpy() if om.amount_field in om.kinds else np.zeros(len(times))
    users = pl.read_parquet(om.run / "users.parquet").sort("user_idx")["user_id"].cast(pl.Utf8).to_list()
    gap_b = gap_buckets(np.asarray(seq.gap, dtype=np.float64))
    tokens, codes = np.asarray(seq.tokens), np.asarray(seq.codes)
    todo = np.flatnonzero(ends > starts)
    L, n_written = om.max_len, 0
    for b in tqdm(range(0, len(todo), batch_size), desc="embed", unit="batch", disable=not progress):
        states = []
        for u in todo[b:b + batch_size].tolist():
            s, e = int(starts[u]), int(ends[u])
            w0 = max(s, e - L)
            t_last = int(times[e - 1])
            m0 = s + int(np.searchsorted(times[s:e], t_last - om.spend_days * DAY, side="right"))
            states.append(UserState(
                user_id=users[u], user_idx=u, model_version=om.model_version, n_events=e - s,
                last_time=t_last, tokens=tokens[w0:e].astype(np.int32), codes=codes[w0:e].astype(np.int32),
                gap=gap_b[w0:e].astype(np.int8), times=times[m0:e].astype(np.int64),
                amounts=amounts[m0:e].astype(np.float64)))
        states = om.refresh(states, time.time(), cache=False)
        store.put_many({s.user_id: s.encode() for s in states})
        n_written += len(states)
    meta = {"run": str(Path(om.run).resolve()), "model": om.model_name, "model_version": om.model_version,
            "until": until, "until_s": cut_s, "users": n_written, "max_len": L, "spend_days": om.spend_days,
            "seconds": round(time.perf_counter() - started, 2)}
    store.put_meta("embed", json.dumps(meta).encode())
    log.info("embedded %d users in %.1f s", n_written, meta["seconds"])
    return meta
