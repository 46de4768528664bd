"""An event that got a 200 is never lost: `kill -9` the real service process in the middle of a load, then
every answered event is in the user's log, and a restarted service folds all of them into the states."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from pantherseq.serve.scorer import Scorer
from pantherseq.serve.service import Service
from pantherseq.serve.state import UserState, decode_event
from pantherseq.store import open_store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_kill_9_mid_load_loses_no_answered_event(served, tmp_path):
    db = tmp_path / "states.db"
    shutil.copy(served["url"].removeprefix("sqlite:///"), db)
    url = f"sqlite:///{db}"
    proc, base = _serve(served, url)
    try:
        with open_store(url) as s:
            users = [u for u in ("u000001", "u000002", "u000003") if s.get_many([u])[0] is not None]
            before = {u: UserState.decode(s.get_many([u])[0]) for u in users}
        assert users
        answered: list[tuple[str, int, float]] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(timeout=5) as client:
                i = 0
                while not stop.is_set():
                    u = users[i % len(users)]
                    t = datetime.fromtimestamp(before[u].last_time) + timedelta(minutes=i + 1)
                    amount = round(1.0 + i * 0.01, 2)
                    try:
                        r = client.post(f"{base}/score", json={
                            "user_id": u, "timestamp": t.isoformat(), "merchant_id": "m00001", "amount": amount,
                            "category": "grocery", "channel": "pos"})
                    except httpx.HTTPError:
                        return  # the server died under us: that request was never answered
                    if r.status_code == 200:
                        answered.append((u, r.json()["event_seq"], amount))
                    i += 1

        th = threading.Thread(target=load)
        th.start()
        while len(answered) < 60 and th.is_alive():
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # mid-load: the client is still sending
        proc.wait(10)
        stop.set()
        th.join(10)
        assert len(answered) >= 60
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    with open_store(url) as s:
        for u in users:
            logged = {seq: decode_event(b) for seq, b in s.events_since(u, 0)}
            mine = [(seq, a) for uu, seq, a in answered if uu == u]
            for seq, amount in mine:
                assert seq in logged and logged[seq]["fields"]["amount"] == amount
    # a restarted service folds every logged event into the states
    om = Scorer(served["run"], "panther", served["fraud_dir"])
    store = open_store(url)
    service = Service(om, store)
    service.start()
    try:
        assert service.refresher.wait_idle(60)
        for u in users:
            st = UserState.decode(store.get_many([u])[0])
            n_logged = len(store.events_since(u, 0))
            assert st.log_seq == n_logged and st.n_events == before[u].n_events + n_logged
            assert n_logged >= sum(1 for uu, _, _ in answered if uu == u)
    finally:
        service.stop()
        store.close()


@pytest.mark.slow
def test_sigterm_stops_serve_and_the_refresh_workers_it_started(served, tmp_path):
    """uvicorn (>= 0.29) shuts down on SIGTERM and then raises it again: `serve` must still run its clean-up,
    stopping the `--workers` it started (they were left running, found by benchmarks/serve.py), and exit 0."""
    db = tmp_path / "states.db"
    shutil.copy(served["url"].removeprefix("sqlite:///"), db)
    proc, _ = _serve(served, f"sqlite:///{db}", "--workers", "1")
    workers: list[int] = []
    try:
        children = [t / "children" for t in Path(f"/proc/{proc.pid}/task").iterdir()]
        workers = [int(p) for c in children if c.exists() for p in c.read_text().split()]
        assert len(workers) == 1
        # refreshing is background work: the worker lowers its priority (`refresh --nice`, default 10)
        want = min(19, os.getpriority(os.PRIO_PROCESS, proc.pid) + 10)
        for _ in range(300):
            if os.getpriority(os.PRIO_PROCESS, workers[0]) == want:
                break
            time.sleep(0.1)
        assert os.getpriority(os.PRIO_PROCESS, workers[0]) == want
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stderr.read().decode()[-2000:]
        assert not _ours(workers[0], db)  # stopped (and reaped) by serve
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pid in workers:
            if _ours(pid, db):  # left running: stop it
                os.kill(pid, signal.SIGKILL)


def _serve(served: dict, url: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """`pantherseq serve` on `url` in its own process, once /health answers; (process, base URL)."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PANTHERSEQ_MALLOC": "system"}
    proc = subprocess.Popen([sys.executable, "-m", "pantherseq.cli", "serve", "--run", str(served["run"]),
                             "--model", "panther", "--fraud-dir", str(served["fraud_dir"]), "--store", url,
                             "--port", str(port), *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.1)
        if proc.poll() is not None:
            pytest.fail(proc.stderr.read().decode()[-3000:])
    proc.kill()
    pytest.fail(f"{base} did not start")


def _ours(pid: int, db: Path) -> bool:
    """A live (not zombie) process `pantherseq refresh` on this test's store."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and str(db) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
