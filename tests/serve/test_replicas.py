"""Horizontal scale (issue 14): two `pantherseq serve` processes (one `--external-refresh`, one `--workers 1`,
which starts a `pantherseq refresh` worker) on one Redis give every event the score one in-process service gives on the same replay —
terminal history and /feedback labels included — and the time order and the new-user cap hold across the
processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta

import httpx
import polars as pl
import pytest

from pantherseq.serve.embed import embed_users
from pantherseq.serve.refresher import run_worker
from pantherseq.serve.scorer import Scorer
from pantherseq.serve.service import Refused, Service
from pantherseq.serve.state import UserState
from pantherseq.store import open_store
from stolen_routine import PERIODS
from store.conftest import free_port

from .test_service import FIELDS, _service, _tx

N_EVENTS = 60
SHIFT = timedelta(days=8)  # past the 7-day label delay: the second pass reads the first pass's events and labels


def _replay(events: pl.DataFrame) -> list[tuple[dict, int]]:
    """The first N_EVENTS test events, then the same events 8 days later; every 4th gets a fraud label."""
    rows = list(events.head(N_EVENTS).iter_rows(named=True))
    shifted = [{**r, "timestamp": r["timestamp"] + SHIFT} for r in rows]
    return [(_tx(r), int(i % 4 == 0)) for i, r in enumerate(rows + shifted)]


def _processes(served, url: str, ports: list[int], log_dir) -> list[subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PANTHERSEQ_MALLOC": "system"}
    common = ["--run", str(served["run"]), "--model", "panther", "--fraud-dir", str(served["fraud_dir"]),
              "--store", url]
    cmds = [["serve", *common, "--port", str(p), "--new-users-per-minute", "3"] for p in ports]
    cmds[0].append("--external-refresh")
    cmds[1] += ["--workers", "1"]  # starts the refresh worker process (`pantherseq refresh`) and stops it on exit
    return [subprocess.Popen([sys.executable, "-m", "pantherseq.cli", *c], env=env, stdout=subprocess.DEVNULL,
                             stderr=open(log_dir / f"proc{i}.log", "wb"))
            for i, c in enumerate(cmds)]


def _wait_ready(base: str, procs: list[subprocess.Popen], log_dir) -> None:
    for _ in range(1200):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
        for i, p in enumerate(procs):
            assert p.poll() is None, (log_dir / f"proc{i}.log").read_text()[-3000:]
    pytest.fail(f"{base} did not start")


def _refreshed(store, user: str, seq: int, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        blob = store.get_many([user])[0]
        if blob is not None and UserState.decode(blob).log_seq >= seq:
            return
        time.sleep(0.01)
    pytest.fail(f"the worker did not refresh {user} up to {seq}")


@pytest.mark.slow
def test_two_scorer_processes_and_a_worker_score_as_one_process(served, redis_url, tmp_path):
    import redis

    events = pl.read_parquet(served["run"] / "events.parquet")
    start = datetime.fromisoformat(PERIODS["test_start"])
    test = events.filter(pl.col("timestamp") >= start).sort("timestamp", maintain_order=True)
    replay = _replay(test.select("user_id", "timestamp", *FIELDS))
    ref_url, url = redis_url.rsplit("/", 1)[0] + "/1", redis_url.rsplit("/", 1)[0] + "/2"
    scorer = Scorer(served["run"], "panther", served["fraud_dir"])
    for u in (ref_url, url):
        with redis.Redis.from_url(u) as client:
            client.flushdb()
        with open_store(u) as s:
            embed_users(scorer, s, PERIODS["test_start"], progress=False)

    # one process, refreshed after every event
    ref = Service(scorer, open_store(ref_url), refresh=False)
    ref.start()
    expected = []
    for tx, label in replay:
        out = ref.score(tx)
        ref.refresh_users([tx["user_id"]])
        if label:
            assert ref.feedback(tx["user_id"], out["event_seq"], 1)
        expected.append((out["score"], out["event_seq"], out["cold_start"], out["stale"]))
    m = replay[-1][0]["merchant_id"]
    t_last = int(datetime.fromisoformat(replay[-1][0]["timestamp"]).timestamp())
    assert ref.terminal_counts(m, t_last)[-1][0] > 0  # the second pass read served events at its terminals
    ref.stop()

    # two scorer processes, one refresh worker: events alternate between the processes, labels go to the other
    ports = [free_port(), free_port()]
    bases = [f"http://127.0.0.1:{p}" for p in ports]
    procs = _processes(served, url, ports, tmp_path)
    got = []
    try:
        for b in bases:
            _wait_ready(b, procs, tmp_path)
        with open_store(url) as store, httpx.Client(timeout=30) as client:
            for i, (tx, label) in enumerate(replay):
                r = client.post(f"{bases[i % 2]}/score", json=tx)
                assert r.status_code == 200, r.text
                out = r.json()
                _refreshed(store, tx["user_id"], out["event_seq"])
                if label:
                    fb = {"user_id": tx["user_id"], "event_seq": out["event_seq"], "label": 1}
                    assert client.post(f"{bases[(i + 1) % 2]}/feedback", json=fb).status_code == 200
                got.append((out["score"], out["event_seq"], out["cold_start"], out["stale"]))
            assert got == expected and all(s is not None for s, *_ in got)

            # time order across processes: an event older than the one the other process took is 409
            tx = replay[-1][0]
            late = {**tx, "timestamp": (datetime.fromisoformat(tx["timestamp"]) - timedelta(hours=1)).isoformat()}
            assert client.post(f"{bases[1]}/score", json=late).status_code == 409
            # the new-user cap (3 a minute) is counted in the store, not per process
            codes = [client.post(f"{bases[i % 2]}/score", json={**tx, "user_id": f"new-{i}"}).status_code
                     for i in range(4)]
            assert codes == [200, 200, 200, 429]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


BODY = {"user_id": "u-rep", "timestamp": "2024-03-20 09:30:00", "merchant_id": "m-rep", "amount": 20.0,
        "category": "grocery", "channel": "pos"}


@pytest.fixture
def pair(served, tmp_path):
    """Two services on one SQLite store (two connections, as two processes would have), queueing
    refreshes for a worker."""
    a = _service(served, tmp_path, refresh=False)
    a.stop()
    url = f"sqlite:///{tmp_path / 'states.db'}"
    a = Service(a.scorer, open_store(url), external_refresh=True)
    b = Service(a.scorer, open_store(url), external_refresh=True)
    a.start()
    b.start()
    yield a, b
    for s in (a, b):
        s.stop()
        s.store.close()


def test_two_services_on_one_sqlite_store_share_terminals_labels_and_time_order(pair):
    a, b = pair
    t = datetime.fromisoformat(BODY["timestamp"])
    later = int((t + SHIFT).timestamp())
    before = b.terminal_features("m-rep", later)
    seq = a.score(BODY)["event_seq"]
    assert b.terminal_features("m-rep", later)["term_n_7d"] == before["term_n_7d"] + 1
    assert b.feedback("u-rep", seq, 1)  # a label given to the other process
    assert a.terminal_features("m-rep", later)["term_frauds_7d"] == before["term_frauds_7d"] + 1
    with pytest.raises(Refused) as refused:
        b.score({**BODY, "timestamp": (t - timedelta(minutes=1)).isoformat()})
    assert refused.value.status == 409
    assert b.score({**BODY, "timestamp": (t + timedelta(minutes=1)).isoformat()})["event_seq"] == seq + 1


def test_a_worker_refreshes_what_the_services_queued(pair):
    a, b = pair
    user = next(iter(a.scorer.user_index))
    last = a.current_state(user)[0].last_time
    t = datetime.fromtimestamp(last) + timedelta(hours=1)
    a.score({**BODY, "user_id": user, "timestamp": t.isoformat()})
    seq = b.score({**BODY, "user_id": user, "timestamp": (t + timedelta(minutes=1)).isoformat()})["event_seq"]
    stop = threading.Event()
    worker = threading.Thread(target=run_worker, args=(a, "w", stop))
    worker.start()
    try:
        _refreshed(a.store, user, seq, 30)
    finally:
        stop.set()
        worker.join(10)
    assert a.store.claim_refresh("check", 10, 0) == []  # both queue entries acknowledged
