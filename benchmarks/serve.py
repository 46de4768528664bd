"""Benchmark of `pantherseq serve` (issues 5 and 14): latency at a fixed rate and throughput at saturation on the
SQLite and Redis stores with refresh on, several scorer processes on one Redis, a soak, a security / fuzz run
and a replicas check, replaying the fraud handbook's test-period transactions in time order.

    .venv/bin/python benchmarks/serve.py [--run runs/fraud-handbook/handbook] [--model panther]
        [--fraud-dir RUN/fraud-panther] [--until 2018-08-08] [--rate 200] [--warmup 5] [--seconds 30]
        [--sat-seconds 20] [--concurrency 16] [--scorers 2] [--soak-minutes 10] [--fuzz 10000]
        [--replicas-k 2000] [--sections sqlite,redis,sqlite:norefresh,scale,soak,security,replicas]
        [--out benchmarks/results/serve.json]

Needs the run and risk model of `benchmarks/fraud.py`. Every section gets a fresh store: SQLite ones a copy
of one `pantherseq embed --until` (states as of the test period's start), Redis ones a real `redis-server`
on a free loopback port (`appendonly yes`, `appendfsync everysec`: its standard durable setting) embedded
afresh. Servers are `pantherseq serve` processes; the load generator is another process (a minimal asyncio
HTTP/1.1 keep-alive client on loopback). Everything shares the machine's cores.

- `sqlite`, `redis` (and `sqlite:norefresh`, the request path alone, for comparison; `B:thread` refreshes in
  the serving process as before issue 14): one scorer `--external-refresh` and one `pantherseq refresh`
  worker process. First open-loop at `--rate` requests/s for `--warmup` + `--seconds` (latency measured from
  each request's *scheduled* send time, so a slow server cannot hide its queueing; the warm-up's requests
  are not in the percentiles), then closed-loop with `--concurrency` connections for `--sat-seconds`.
  Server time is the `latency_ms` each answer carries. Refresh lag (event appended -> its user's refreshed
  state written) is recorded inside the worker (the code of `pantherseq refresh`, run through
  `serve.py --refresh-worker` to write each lag to a file: an `--external-refresh` scorer's /stats has none),
  for the events appended in the phase, once the store's refresh queue has drained.
- `scale` (`redis_scale`): `--scorers` scorer processes and one refresh worker on one Redis, the closed-loop
  generator's connections spread round-robin over their ports.
- `soak`: `--soak-minutes` at `--rate` on SQLite (after a `--soak-warmup` not counted, 3 minutes: the
  caches, bounded in bytes, fill in it), the RSS of the scorer and of the worker (with their children, /proc)
  every `--soak-sample-s`, p99 per minute. RSS growth = the median of the soak's last minute of samples over
  that of its first minute; the growth from the load's start (warm-up included) is in `details`.
- `security`: a scorer with an API keys file and a refresh worker (`--workers 1`) on a SQLite copy: every
  attack of issue 14 (no key, wrong scope, internal ids, huge bodies and values and ids, a batch of 1,000,
  time going backwards, booleans as times...), then `--fuzz` seeded random requests over every endpoint
  (junk JSON, wrong types, control and surrogate characters, huge and nested values, random paths and ids);
  every status counted. Then a SIGTERM, the store poisoned as tests/serve/test_security.py does, a restart,
  a kill -9 and a restart: each must come up (/health 200) and score. A store claimed by another model or
  another run must be refused (exit 2).
- `replicas`: on one Redis, the first `--replicas-k` test transactions and the same 8 days later (every 4th
  labelled through /feedback), as tests/serve/test_replicas.py does: one in-process service refreshing after
  each event, and two scorer processes (one with `--workers 1`) alternating per request, each request
  waiting until the worker has refreshed its user; the scores, sequence numbers and flags must be identical.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Self
from urllib.parse import quote

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SECTIONS = ("sqlite", "redis", "sqlite:norefresh", "scale", "soak", "security", "replicas")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 300, log: Path | None = None) -> None:
    import httpx

    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()[-3000:] if log else ''}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"{url} not up after {timeout} s")


def transactions(run: Path, until: str, out: Path) -> int:
    import polars as pl

    from pantherseq.config import load_toml

    ev = pl.read_parquet(run / "events.parquet")
    fields = [f["name"] for f in load_toml(run / "config.toml")["fields"] if not f.get("derive")]
    tx = (ev.filter(pl.col("timestamp") >= pl.lit(until).str.to_datetime())
          .sort("timestamp", maintain_order=True)
          .select(pl.col("user_id").cast(pl.Utf8), pl.col("timestamp").dt.strftime("%Y-%m-%dT%H:%M:%S"), *fields))
    out.write_text("\n".join(json.dumps(r) for r in tx.iter_rows(named=True)))
    return tx.height


def read_tx(tx_file: Path, offset: int, n: int) -> list[dict]:
    return [json.loads(s) for s in tx_file.read_text().splitlines()[offset:offset + n]]


# -- the load generator (a separate process: `serve.py --load ...`) ------------------------------------
# A minimal HTTP/1.1 keep-alive client on asyncio streams: requests are encoded before the clock starts and
# a response costs one header parse, so one client core drives the server well past its capacity (an httpx
# AsyncClient saturated its own core at ~120 requests/s here, below the server's capacity).
class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.closed = False  # the server said `Connection: close`

    @classmethod
    async def open(cls, host: str, port: int) -> Conn:
        return cls(*await asyncio.open_connection(host, port))

    async def post(self, raw: bytes) -> tuple[int, bytes]:
        """Send one encoded request (any method) and read its answer: (status, body)."""
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            low = line.lower()
            if low.startswith(b"content-length:"):
                length = int(line[15:])
            elif low.startswith(b"connection:") and b"close" in low:
                self.closed = True
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def http_request(host: str, port: int, method: str, path: str, body: bytes | None = None,
                 headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """One HTTP/1.1 request as bytes (the path already percent-encoded)."""
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", *(f"{k}: {v}" for k, v in headers)]
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b"")


def encode_requests(host: str, port: int, txs: list[dict]) -> list[bytes]:
    return [http_request(host, port, "POST", "/score", json.dumps(tx).encode()) for tx in txs]


def _split_url(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    return host, int(port)


async def _open_loop(base: str, txs: list[dict], rate: float, pool_size: int = 64, warmup_s: float = 0.0,
                     samples: bool = False) -> dict:
    """Request i is due at t0 + i / rate; latency is measured from that due time (queueing included).
    Requests due in the first `warmup_s` are sent but left out of the percentiles (errors count throughout);
    `samples`: also every request's [due time - t0 in s, latency in ms or None when it failed]. A user's
    request is sent once their previous one is answered (the wait is in its latency): two in flight could
    be taken out of order, the later first, and the earlier would be a 409 (time order is enforced)."""
    host, port = _split_url(base)
    raws = encode_requests(host, port, txs)
    pool: asyncio.Queue[Conn] = asyncio.Queue()
    for _ in range(pool_size):
        pool.put_nowait(await Conn.open(host, port))
    lat, server, errors, statuses = [], [], 0, Counter()
    got: list = [None] * len(raws) if samples else []
    t0 = time.perf_counter() + 0.2
    t0_wall = time.time() + 0.2
    last: dict[str, asyncio.Future] = {}  # each user's request in flight
    behind = 0

    async def one(i: int) -> None:
        nonlocal behind
        user, done = txs[i]["user_id"], asyncio.get_running_loop().create_future()
        before, last[user] = last.get(user), done
        if before is not None:
            behind += 1
            await before
        try:
            await send(i)
        finally:
            done.set_result(None)
            if last.get(user) is done:
                del last[user]

    async def send(i: int) -> None:
        nonlocal errors
        due = t0 + i / rate
        conn = await pool.get()
        try:
            status, body = await conn.post(raws[i])
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            statuses["conn"] += 1
            conn = await Conn.open(host, port)
        else:
            statuses[str(status)] += 1
            if status == 200:
                took = time.perf_counter() - due
                if samples:
                    got[i] = round(took * 1e3, 3)
                if i / rate >= warmup_s:
                    lat.append(took)
                    server.append(json.loads(body)["latency_ms"])
            else:
                errors += 1
            if conn.closed:
                conn.close()
                conn = await Conn.open(host, port)
        pool.put_nowait(conn)

    tasks = []
    for i in range(len(raws)):  # start each request at its time: only in-flight ones are pending
        await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    while not pool.empty():
        pool.get_nowait().close()
    warm = sum(i / rate < warmup_s for i in range(len(raws)))
    out = {"requests": len(txs), "warmup_requests": warm, "ok": len(lat), "errors": errors, "wall_s": wall,
           "sent_after_the_users_previous": behind,
           "t0_wall": t0_wall, "achieved_rps": (len(lat) + warm) / wall, "statuses": dict(statuses),
           **_pct(lat, "ms", 1e3), **_pct(server, "server_ms", 1.0)}
    if samples:
        out["samples"] = [[round(i / rate, 3), x] for i, x in enumerate(got)]
    return out


async def _closed_loop(bases: list[str], txs: list[dict], concurrency: int, seconds: float) -> dict:
    """`concurrency` connections, spread round-robin over `bases` (several scorer processes), each sending its
    next transaction as soon as the previous one is answered. A user's transactions all go, in order, on one
    connection (by a hash of the id): two connections racing one user's events would make the later one
    land first and the earlier one a 409 (the service refuses events older than the user's last)."""
    targets = [_split_url(b) for b in bases]
    lanes: list[list[dict]] = [[] for _ in range(concurrency)]
    for tx in txs:
        lanes[zlib.crc32(tx["user_id"].encode()) % concurrency].append(tx)
    raws = [encode_requests(*targets[k % len(targets)], lane) for k, lane in enumerate(lanes)]
    lat, server, errors, statuses = [], [], 0, Counter()
    end = time.perf_counter() + seconds
    t0, t0_wall = time.perf_counter(), time.time()

    async def worker(k: int) -> None:
        nonlocal errors
        host, port = targets[k % len(targets)]
        conn = await Conn.open(host, port)
        for raw in raws[k]:
            if time.perf_counter() >= end:
                break
            s = time.perf_counter()
            try:
                status, body = await conn.post(raw)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                statuses["conn"] += 1
                conn = await Conn.open(host, port)
                continue
            statuses[str(status)] += 1
            if status == 200:
                lat.append(time.perf_counter() - s)
                server.append(json.loads(body)["latency_ms"])
            else:
                errors += 1
        conn.close()

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"requests": len(lat) + errors, "ok": len(lat), "errors": errors, "wall_s": wall, "t0_wall": t0_wall,
            "saturation_rps": len(lat) / wall, "connections": concurrency, "processes": len(bases),
            "statuses": dict(statuses), **_pct(lat, "ms", 1e3), **_pct(server, "server_ms", 1.0)}


def _pct(values: list[float], unit: str, scale: float) -> dict:
    if not values:
        return {}
    a = np.asarray(values) * scale
    return {f"p{q}_{unit}": round(float(np.percentile(a, q)), 3) for q in (50, 95, 99)}


def load_main(args: argparse.Namespace) -> None:
    txs = read_tx(Path(args.tx), args.offset, args.n)
    if args.mode == "rate":
        out = asyncio.run(_open_loop(args.url, txs, args.rate, warmup_s=args.warmup, samples=args.samples))
    else:
        out = asyncio.run(_closed_loop(args.url.split(","), txs, args.concurrency, args.seconds))
    print(json.dumps(out))


# -- the refresh worker with its lags recorded (a separate process: `serve.py --refresh-worker FILE ...`) --
def refresh_worker_main(lag_file: str, argv: list[str]) -> int:
    """`pantherseq refresh ARGV` (the same code), each refreshed user's lag also written to `lag_file` as
    "<wall time of the state write> <lag s>" (run_worker observes it on the service's metrics)."""
    from pantherseq.cli import main as cli_main
    from pantherseq.serve import service

    out = open(lag_file, "a", buffering=1)  # noqa: SIM115 (open for the process's life)

    class Recorder:
        def __init__(self, histogram):
            self.histogram = histogram

        def observe(self, lag: float) -> None:
            out.write(f"{time.time():.4f} {lag:.4f}\n")
            self.histogram.observe(lag)

    class Recording(service.Metrics):
        def __init__(self):
            super().__init__()
            self.refresh_lag = Recorder(self.refresh_lag)

    service.Metrics = Recording
    return cli_main(["refresh", *argv])


# -- the driver: processes, stores, measurements ---------------------------------------------------------
def cli(*a: str) -> list[str]:
    return [sys.executable, "-m", "pantherseq.cli", *a]


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc/*/stat)."""
    parents: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def rss_mb(pid: int) -> float:
    """VmRSS of `pid` and its descendants, MiB (0 for a process gone)."""
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return round(total / 1024, 1)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
    """Stop a process we started (and then whatever it started that is left); its exit code."""
    kids = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for k in kids:  # e.g. the refresh workers of a `serve --workers` killed with -9
        try:
            os.kill(k, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode


class Procs:
    """The processes of a section, logging to files in `tmp`, stopped in reverse order at the end."""

    def __init__(self, tmp: Path):
        self.tmp, self.items = tmp, []

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=open(log, "ab"))  # noqa: SIM115
        proc.log = log
        self.items.append(proc)
        return proc

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        for p in reversed(self.items):
            stop(p)


def start_redis(procs: Procs) -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found: `make setup` installs it (apt-get install redis-server)")
    port = free_port()
    procs.start("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(procs.tmp), "--save", "",
                          "--appendonly", "yes", "--appendfsync", "everysec"])
    import redis

    for _ in range(100):
        try:
            redis.Redis(port=port).ping()
            return f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


class Stores:
    """Fresh stores for the sections: SQLite ones copied from one embedding, Redis ones embedded afresh."""

    def __init__(self, args: argparse.Namespace, tmp: Path):
        self.args, self.template, self.template_s = args, tmp / "template" / "serve.db", None

    def common(self, url: str) -> list[str]:
        return ["--run", self.args.run, "--model", self.args.model, "--fraud-dir", self.args.fraud_dir, "--store", url]

    def embed(self, url: str) -> float:
        t = time.perf_counter()
        subprocess.run(cli("embed", *self.common(url), "--until", self.args.until), check=True, env=env(),
                       stdout=subprocess.DEVNULL)
        return round(time.perf_counter() - t, 1)

    def sqlite(self, folder: Path) -> tuple[str, float]:
        if self.template_s is None:
            self.template_s = self.embed(f"sqlite:///{self.template}")
        folder.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal"):  # embed has exited: a WAL left over (if any) is part of the file
            if Path(f"{self.template}{suffix}").exists():
                shutil.copy(f"{self.template}{suffix}", folder / f"serve.db{suffix}")
        return f"sqlite:///{folder / 'serve.db'}", self.template_s

    def redis(self, procs: Procs) -> tuple[str, float]:
        url = start_redis(procs)
        return url, self.embed(url)

    def fresh(self, backend: str, procs: Procs) -> tuple[str, float]:
        return self.sqlite(procs.tmp) if backend == "sqlite" else self.redis(procs)


def queue_len(url: str) -> int:
    """Entries in the store's refresh queue (entries are deleted once their refreshed state is written)."""
    if url.startswith("sqlite:"):
        import sqlite3

        db = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30)
        try:
            return db.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
        finally:
            db.close()
    import redis

    from pantherseq.store.base import QUEUE_KEY

    with redis.Redis.from_url(url) as r:
        return int(r.xlen(QUEUE_KEY))


def worker_cmd(stores: Stores, url: str, lag_file: Path) -> list[str]:
    return [sys.executable, __file__, "--refresh-worker", str(lag_file), *stores.common(url)]


def worker_lags(url: str, lag_file: Path, t_from: float, t_to: float, timeout: float = 300.0) -> dict:
    """Once the refresh queue has drained (at most `timeout`), the lags of the events appended in
    [t_from, t_to] (wall times); `drain_s`: how long the queue took to empty after the load stopped."""
    t0 = time.perf_counter()
    left = queue_len(url)
    while left and time.perf_counter() - t0 < timeout:
        time.sleep(0.2)
        left = queue_len(url)
    drain = round(time.perf_counter() - t0, 2)
    time.sleep(0.5)  # the worker writes a lag just after acknowledging its entry
    lags = []
    for line in lag_file.read_text().splitlines() if lag_file.exists() else []:
        written, lag = map(float, line.split())
        if t_from <= written - lag <= t_to:
            lags.append(lag)
    pct = {f"p{q}": round(float(np.percentile(lags, q)), 3) for q in (50, 95, 99)} if lags else {}
    return {**pct, "refreshed": len(lags), "queue_left": left, "drain_s": drain}


def drained_stats(base: str, timeout: float = 300.0) -> dict:
    """In-process refresh (`B:thread`): the service's /stats once its refresh queue is empty (so every event
    of the phase has its lag recorded), then reset; `drain_s` says how long the queue took to empty."""
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if httpx.get(f"{base}/stats", timeout=30).json()["queue"] == 0:
            break
        time.sleep(0.1)
    st = httpx.get(f"{base}/stats", params={"reset": True}, timeout=30).json()
    lag = {k: round(v, 3) for k, v in st["refresh_lag_s"].items()}
    return {**lag, "refreshed": st["refreshed"], "queue_left": st["queue"],
            "drain_s": round(time.perf_counter() - t0, 2)}


def load(url: str, tx_file: Path, mode: str, n: int, offset: int = 0, **kw) -> list[str]:
    """The load generator's command line."""
    cmd = [sys.executable, __file__, "--load", "--url", url, "--tx", str(tx_file), "--mode", mode, "--n", str(n),
           "--offset", str(offset)]
    for k, v in kw.items():
        cmd += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return cmd


def run_load(*a, **kw) -> dict:
    return json.loads(subprocess.run(load(*a, **kw), check=True, capture_output=True, text=True).stdout)


def run_backend(spec: str, args: argparse.Namespace, tx_file: Path, n_tx: int, tmp: Path, stores: Stores) -> dict:
    backend, _, mode = spec.partition(":")  # "": a refresh worker process; "norefresh"; "thread": in-process
    refresh = {"": "worker", "norefresh": "off", "thread": "in-process"}[mode]
    n_rate = int(args.rate * (args.warmup + args.seconds))
    if n_rate + 1000 > n_tx:
        raise SystemExit(f"only {n_tx} test transactions; lower --seconds")
    with Procs(tmp) as procs:
        url, embed_s = stores.fresh(backend, procs)
        port, lag_file = free_port(), tmp / "lags.txt"
        extra = {"worker": ["--external-refresh"], "off": ["--no-refresh"], "in-process": []}[refresh]
        server = procs.start("serve", cli("serve", *stores.common(url), "--port", str(port), *extra))
        if refresh == "worker":
            procs.start("refresh", worker_cmd(stores, url, lag_file))
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health", server, log=server.log)

        def lags(phase: dict, t_from: float) -> dict:
            if refresh == "worker":
                return worker_lags(url, lag_file, t_from, phase["t0_wall"] + phase["wall_s"])
            return drained_stats(base) if refresh == "in-process" else {}

        fixed = run_load(base, tx_file, "rate", n_rate, rate=args.rate, warmup=args.warmup)
        lag_fixed = lags(fixed, fixed["t0_wall"] + args.warmup)
        sat = run_load(base, tx_file, "sat", n_tx - n_rate, n_rate, concurrency=args.concurrency,
                       seconds=args.sat_seconds)
        lag_sat = lags(sat, sat["t0_wall"])
    return {"rate_rps": args.rate, "p50_ms": fixed.get("p50_ms"), "p95_ms": fixed.get("p95_ms"),
            "p99_ms": fixed.get("p99_ms"), "server_p50_ms": fixed.get("p50_server_ms"),
            "server_p99_ms": fixed.get("p99_server_ms"), "errors": fixed["errors"] + sat["errors"],
            "saturation_rps": round(sat["saturation_rps"], 1), "refresh_lag_p99_s": lag_fixed.get("p99"),
            "refresh": refresh,
            "details": {"fixed_rate": fixed, "saturation": sat, "refresh_fixed_rate": lag_fixed,
                        "refresh_saturation": lag_sat, "embed_s": embed_s, "store": backend}}


def run_scale(args: argparse.Namespace, tx_file: Path, n_tx: int, tmp: Path, stores: Stores) -> dict:
    """`--scorers` scorer processes (`--external-refresh`) and one refresh worker on one Redis, closed loop."""
    with Procs(tmp) as procs:
        url, embed_s = stores.redis(procs)
        ports, lag_file = [free_port() for _ in range(args.scorers)], tmp / "lags.txt"
        servers = [procs.start(f"serve{i}", cli("serve", *stores.common(url), "--port", str(p), "--external-refresh"))
                   for i, p in enumerate(ports)]
        procs.start("refresh", worker_cmd(stores, url, lag_file))
        bases = [f"http://127.0.0.1:{p}" for p in ports]
        for b, s in zip(bases, servers):
            wait_http(f"{b}/health", s, log=s.log)
        sat = run_load(",".join(bases), tx_file, "sat", n_tx, concurrency=args.concurrency, seconds=args.sat_seconds)
        lag = worker_lags(url, lag_file, sat["t0_wall"], sat["t0_wall"] + sat["wall_s"])
    return {"processes": args.scorers, "refresh_workers": 1, "connections": args.concurrency,
            "saturation_rps": round(sat["saturation_rps"], 1), "p50_ms": sat.get("p50_ms"), "p99_ms": sat.get("p99_ms"),
            "server_p99_ms": sat.get("p99_server_ms"), "errors": sat["errors"], "refresh_lag_p99_s": lag.get("p99"),
            "details": {"saturation": sat, "refresh": lag, "embed_s": embed_s, "store": "redis"}}


def run_soak(args: argparse.Namespace, tx_file: Path, n_tx: int, tmp: Path, stores: Stores) -> dict:
    """`--soak-minutes` at `--rate` on SQLite with a refresh worker; RSS of both (with children) sampled."""
    n = int(args.rate * (args.soak_warmup + args.soak_minutes * 60))
    if n > n_tx:
        raise SystemExit(f"only {n_tx} test transactions for a {args.soak_minutes}-minute soak")
    with Procs(tmp) as procs:
        url, _ = stores.sqlite(tmp)
        port, lag_file = free_port(), tmp / "lags.txt"
        server = procs.start("serve", cli("serve", *stores.common(url), "--port", str(port), "--external-refresh"))
        worker = procs.start("refresh", worker_cmd(stores, url, lag_file))
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health", server, log=server.log)
        out_file = tmp / "load.json"
        with open(out_file, "w") as out:
            gen = subprocess.Popen(load(base, tx_file, "rate", n, rate=args.rate, warmup=args.soak_warmup,
                                        samples=True), stdout=out)
            rss, t0 = [], time.time()
            while gen.poll() is None:
                rss.append({"t_s": round(time.time() - t0, 1), "server_mb": rss_mb(server.pid),
                            "worker_mb": rss_mb(worker.pid), "queue": queue_len(url)})
                time.sleep(args.soak_sample_s)
        if gen.returncode:
            raise SystemExit(f"the load generator failed ({gen.returncode})")
        res = json.loads(out_file.read_text())
        lag = worker_lags(url, lag_file, res["t0_wall"] + args.soak_warmup, res["t0_wall"] + res["wall_s"],
                          timeout=0)
    samples = res.pop("samples")
    minutes: dict[int, list[float]] = {}
    for due, ms in samples:
        if due >= args.soak_warmup and ms is not None:
            minutes.setdefault(int((due - args.soak_warmup) // 60), []).append(ms)
    p99 = [round(float(np.percentile(minutes[m], 99)), 3) for m in sorted(minutes)]
    load_start = res["t0_wall"] - t0
    start, end = soak_rss(rss, load_start + args.soak_warmup)
    first = next((s for s in rss if s["t_s"] >= load_start), rss[0])
    at_load = first["server_mb"] + first["worker_mb"]
    return {"minutes": args.soak_minutes, "rate_rps": args.rate, "rss_start_mb": start, "rss_end_mb": end,
            "rss_growth_pct": round(100 * (end / start - 1), 2),
            "p99_ms_first_minute": p99[0] if p99 else None, "p99_ms_last_minute": p99[-1] if p99 else None,
            "errors": res["errors"], "refresh_lag_p99_s": lag.get("p99"),
            "details": {"warmup_s": args.soak_warmup, "p99_ms_per_minute": p99, "load": res, "refresh": lag,
                        "rss_at_load_start_mb": round(at_load, 1),
                        "rss_growth_from_load_start_pct": round(100 * (end / at_load - 1), 2),
                        "rss_samples": rss, "rss": "VmRSS of the scorer and of the refresh worker, with children; "
                        "start / end = the median of the soak's first / last minute of samples"}}


def soak_rss(samples: list[dict], soak_start: float) -> tuple[float, float]:
    """(start, end) MiB of the scorer + worker: the medians of the first and of the last minute of samples
    from `soak_start` on (a sample is one poll; the LRU caches' churn moves single polls by tens of MiB)."""
    total = [(s["t_s"], s["server_mb"] + s["worker_mb"]) for s in samples if s["t_s"] >= soak_start]
    if not total:
        total = [(samples[-1]["t_s"], samples[-1]["server_mb"] + samples[-1]["worker_mb"])]
    t0, t1 = total[0][0], total[-1][0]
    head = [mb for t, mb in total if t < t0 + 60]
    tail = [mb for t, mb in total if t > t1 - 60]
    return round(float(np.median(head)), 1), round(float(np.median(tail)), 1)


# -- security: attacks, fuzz, restarts, store identity ------------------------------------------------------
TOKENS = {"all": "bench-token-every-scope", "gateway": "bench-token-score-only", "ops": "bench-token-read-state"}
SCOPES = {"all": ["score", "feedback", "read-state", "admin"], "gateway": ["score"], "ops": ["read-state"]}


def raw_exchange(port: int, head: bytes, chunks=(), timeout: float = 60.0) -> tuple[int, bytes]:
    """One request on its own connection, for bodies too big to buffer or to be read: (status, body); status
    0 when the server closed the connection without an answer."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(head)
            for c in chunks:
                s.sendall(c)
        except OSError:  # the server answered (and stopped reading) before the body was sent
            pass
        try:
            while True:
                got = s.recv(1 << 16)
                if not got:
                    break
                data += got
                head_, sep, body = data.partition(b"\r\n\r\n")
                length = next((int(x[15:]) for x in head_.split(b"\r\n") if x.lower().startswith(b"content-length:")),
                              None)
                if sep and length is not None and len(body) >= length:
                    break
        except OSError:
            pass
    if not data.startswith(b"HTTP/"):
        return 0, b""
    return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2]


def pick(rng: np.random.Generator, seq):
    """One element of a list as it is (numpy's choice would make one array of mixed types, and drops NULs)."""
    return seq[int(rng.integers(len(seq)))]


def fuzz_value(rng: np.random.Generator, depth: int = 0):
    """Junk for any JSON field: wrong types, edge numbers, hostile text, nesting."""
    k = rng.integers(14)
    if k == 0:
        return None
    if k == 1:
        return bool(rng.integers(2))
    if k == 2:
        return pick(rng, [0, -1, 1, 2**31, 2**63 - 1, 2**63, -(2**63), 2**70, -(10**30)])
    if k == 3:
        return int(rng.integers(-10**6, 10**6))
    if k == 4:
        return pick(rng, [0.0, -0.0, 1e-320, 1e308, -1e308, float("nan"), float("inf"), -float("inf"), 3.5])
    if k == 5:
        return float(rng.normal() * 10 ** rng.integers(0, 12))
    if k in (6, 7, 8):
        return fuzz_text(rng)
    if k == 9:
        return fuzz_time(rng)
    if k == 10 and depth < 4:
        return [fuzz_value(rng, depth + 1) for _ in range(rng.integers(0, 5))]
    if k == 11 and depth < 4:
        return {fuzz_text(rng, 12): fuzz_value(rng, depth + 1) for _ in range(rng.integers(0, 4))}
    return "x" * pick(rng, [129, 201, 1000, 20_000])


HOSTILE = ["\x00feedback", "\x00", "feedback", "ps:1:ilog:feedback", "../../etc/passwd", "%00", "' OR 1=1 --",
           "${jndi:ldap://x}", "<script>", "\u2028", "\u202e", "\ufeff", "\ud800", "\udfff", "😀", "中文", "é",
           " ", "\t", "\x7f", "\x85", "\x9f", "null", "NaN", "-", ".", "/", "\\", "?", "#", "{}", "[]"]


def fuzz_text(rng: np.random.Generator, max_len: int = 300) -> str:
    if rng.random() < 0.4:
        return pick(rng, HOSTILE)
    pool = [chr(c) for c in (*range(0x30), *range(0x7e, 0xa1), 0x2028, 0xd800, 0xdbff, 0xdc00, 0xfffe,
                             0x1f600, 0x10ffff)] + list("abcXYZ019-_:/ ")
    n = int(rng.integers(0, max_len + 1)) if rng.random() < 0.8 else int(rng.integers(0, 20))
    return "".join(pool[i] for i in rng.integers(0, len(pool), n))


def fuzz_time(rng: np.random.Generator):
    return pick(rng, [
        "2018-08-08T10:00:00", "2018-08-08 10:00:00+05:00", "2018-08-08T10:00:00Z", "2018-13-45T99:00:00",
        "1969-12-31T23:59:59", "2100-01-01T00:00:00", "2099-12-31T23:59:59", "3024-01-01", "", "now", "nan",
        "1e10", "0", "+2018-08-08", "2018-W32-3", "9" * 41, "2018-08-08T10:00:00.123456789",
        0, -1, 1533722400, 1533722400.5, 4102444800, 10**12, float("nan"), True])


def fuzz_requests(rng: np.random.Generator, n: int, txs: list[dict]) -> list[tuple[str, str, str | None, bytes | None]]:
    """`n` random requests over every endpoint: (method, path, token or None, body or None). Most carry the
    every-scope key and mutate a real transaction, so they reach the validation and the scoring."""
    users = sorted({t["user_id"] for t in txs})
    out = []
    for _ in range(n):
        token = (TOKENS["all"] if rng.random() < 0.9 else
                 pick(rng, [None, "nope", TOKENS["gateway"], TOKENS["ops"], "x" * 600]))
        r = rng.random()

        def tx() -> dict:
            t = dict(txs[rng.integers(len(txs))])
            if rng.random() < 0.3:  # time moves on (or back): accepted events and 409s
                t["timestamp"] = (datetime.fromisoformat(t["timestamp"]) + timedelta(
                    minutes=int(rng.integers(-600, 6000)))).isoformat()
            for _ in range(rng.integers(0, 4)):
                op, key = rng.integers(4), pick(rng, [*t, "extra", fuzz_text(rng, 20)])
                if op == 0:
                    t.pop(key, None)
                elif op == 1:
                    t[key] = fuzz_value(rng)
                elif op == 2 and key in t:
                    t[key] = fuzz_text(rng)
                else:
                    t["user_id"] = pick(rng, users) if rng.random() < 0.5 else fuzz_text(rng, 140)
            return t

        if r < 0.45:
            method, path, body = "POST", "/score", tx()
        elif r < 0.6:
            k = pick(rng, [0, 1, 2, 5, 16, 17, 40])
            method, path = "POST", "/score/batch"
            body = ({"transactions": [tx() for _ in range(k)]} if rng.random() < 0.85 else
                    {"transactions": fuzz_value(rng)} if rng.random() < 0.5 else [tx()])
        elif r < 0.75:
            method, path = "POST", "/feedback"
            body = {"user_id": pick(rng, users), "event_seq": int(rng.integers(1, 5)), "label": 1}
            for _ in range(rng.integers(0, 3)):
                body[pick(rng, ["user_id", "event_seq", "label", "extra"])] = fuzz_value(rng)
        elif r < 0.88:
            uid = pick(rng, users) if rng.random() < 0.4 else fuzz_text(rng, 200)
            method, path, body = "GET", f"/users/{quote(uid, safe='', errors='surrogatepass')}/state", None
        elif r < 0.93:
            q = pick(rng, ["", "?reset=true", "?reset=1", "?reset=garbage", "?reset=true&reset=false", "?%ff=1"])
            method, path, body = "GET", f"/stats{q}", None
        else:
            method = pick(rng, ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
            path = pick(rng, ["/", "/score/", "/admin", "/users//state", "/users/x", "/%ff", "/metrics",
                                   "/health", "/docs", "/openapi.json", "/score?x=1", "/feedback/../stats"])
            body = tx() if method in ("POST", "PUT", "PATCH") else None
        raw = None
        if body is not None:
            k = rng.random()
            if k < 0.04:
                raw = bytes(rng.integers(0, 256, rng.integers(0, 300), dtype=np.uint8))  # not JSON, not UTF-8
            elif k < 0.08:
                raw = json.dumps(body, allow_nan=True).encode()[: int(rng.integers(0, 50))]  # truncated
            elif k < 0.1:
                raw = json.dumps(fuzz_value(rng), allow_nan=True).encode()  # any JSON document
            else:
                raw = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
        out.append((method, path, token, raw))
    return out


async def _fuzz(port: int, requests: list) -> dict:
    """Send the requests in order on one keep-alive connection (a new one when the server closes it);
    statuses per endpoint, connection failures, the longest answer and whether any holds a server path."""
    host = "127.0.0.1"
    conn = await Conn.open(host, port)
    by_endpoint: dict[str, Counter] = {}
    answered: list[tuple[str, int]] = []
    longest, failures = 0, 0
    for method, path, token, body in requests:
        headers = (("Authorization", f"Bearer {token}"),) if token else ()
        raw = http_request(host, port, method, path, body, headers)
        try:
            status, text = await asyncio.wait_for(conn.post(raw), 60)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            status, text, failures = 0, b"", failures + 1
            conn.close()
            conn = await Conn.open(host, port)
        else:
            if conn.closed:
                conn.close()
                conn = await Conn.open(host, port)
        endpoint = path.split("?")[0] if not path.startswith("/users/") else "/users/{id}/state"
        by_endpoint.setdefault(f"{method} {endpoint}", Counter())[str(status)] += 1
        if status != 200:
            longest = max(longest, len(text))
        if status == 200 and path == "/score":
            answered.append((json.loads(text)["user_id"], json.loads(text)["event_seq"]))
        if b"/tmp" in text or b"/work" in text or b".parquet" in text:
            by_endpoint.setdefault("path_leaks", Counter())[str(status)] += 1
    conn.close()
    return {"by_endpoint": {k: dict(v) for k, v in by_endpoint.items()}, "connection_failures": failures,
            "longest_error_body": longest, "scored": len(answered)}


def run_security(args: argparse.Namespace, tx_file: Path, n_tx: int, tmp: Path, stores: Stores) -> dict:
    import httpx

    from pantherseq.serve.auth import hash_token
    from pantherseq.serve.identity import read_owner, write_owner
    from pantherseq.serve.service import FEEDBACK
    from pantherseq.store import open_store

    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"keys": {k: {"sha256": hash_token(TOKENS[k]), "scopes": SCOPES[k]} for k in TOKENS}}))
    txs = read_tx(tx_file, 0, min(n_tx, 5000))
    statuses: Counter = Counter()
    attacks: list[dict] = []
    with Procs(tmp) as procs:
        url, _ = stores.sqlite(tmp)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = cli("serve", *stores.common(url), "--port", str(port), "--api-keys", str(keys), "--workers", "1")

        def up(name: str) -> subprocess.Popen:
            proc = procs.start(name, cmd)
            wait_http(f"{base}/health", proc, log=proc.log)
            return proc

        server = up("serve")
        client = httpx.Client(base_url=base, timeout=120)

        def attack(name: str, expect: int | tuple, method: str, path: str, auth: str | None = "all",
                   headers: dict | None = None, **kw) -> int:
            """`auth`: a key of TOKENS, or an Authorization header as it is, or None."""
            h = {"authorization": f"Bearer {TOKENS[auth]}" if auth in TOKENS else auth} if auth else {}
            if "json" in kw:  # ASCII JSON, as a client would send a lone surrogate (httpx's own refuses it)
                kw["content"], h["content-type"] = json.dumps(kw.pop("json")).encode(), "application/json"
            try:
                r = client.request(method, path, headers={**h, **(headers or {})}, **kw)
                status, text = r.status_code, r.content
            except httpx.HTTPError as e:
                status, text = 0, str(e).encode()
            record(name, expect, status, text)
            return status

        def record(name: str, expect: int | tuple, status: int, text: bytes) -> None:
            statuses[str(status)] += 1
            ok = status in (expect if isinstance(expect, tuple) else (expect,))
            attacks.append({"attack": name, "status": status, "expected": expect, "ok": ok, "answer_bytes": len(text)})

        def raw(name: str, expect: int | tuple, head: list[str], chunks: list[bytes], request: str = "POST /score",
                ) -> None:
            text = "\r\n".join([f"{request} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
                                  f"Authorization: Bearer {TOKENS['all']}", "Connection: close", *head]) + "\r\n\r\n"
            record(name, expect, *raw_exchange(port, text.encode(), chunks))

        u, tx0 = txs[0]["user_id"], txs[0]
        values = [k for k in tx0 if k not in ("user_id", "timestamp")]
        fb = {"user_id": u, "event_seq": 1, "label": 1}
        # access control: no key, wrong keys, keys without the endpoint's scope
        for auth in (None, "Bearer nope", "Bearer " + "x" * 600, "Basic dXNlcjpwYXNz", "bearer"):
            tag = "no key" if auth is None else f"key {auth[:12]!r}"
            attack(f"{tag}: score", 401, "POST", "/score", auth, json=tx0)
            attack(f"{tag}: batch", 401, "POST", "/score/batch", auth, json={"transactions": [tx0]})
            attack(f"{tag}: feedback", 401, "POST", "/feedback", auth, json=fb)
            attack(f"{tag}: read state", 401, "GET", f"/users/{u}/state", auth)
            attack(f"{tag}: stats", 401, "GET", "/stats", auth)
            attack(f"{tag}: stats reset", 401, "GET", "/stats?reset=true", auth)
        attack("no key: invalid JSON", 401, "POST", "/score", None, content=b"{not json")
        attack("no key: 19 MB body", 401, "POST", "/score", None, content=b"x" * (19 << 20))
        unauth = sorted({a["status"] for a in attacks})
        n0 = len(attacks)
        attack("score key: feedback", 403, "POST", "/feedback", "gateway", json=fb)
        attack("score key: read state", 403, "GET", f"/users/{u}/state", "gateway")
        attack("score key: stats reset", 403, "GET", "/stats?reset=true", "gateway")
        attack("read-state key: score", 403, "POST", "/score", "ops", json=tx0)
        attack("read-state key: batch", 403, "POST", "/score/batch", "ops", json={"transactions": [tx0]})
        attack("read-state key: feedback", 403, "POST", "/feedback", "ops", json=fb)
        attack("read-state key: stats reset", 403, "GET", "/stats?reset=1", "ops")
        wrong_scope = sorted({a["status"] for a in attacks[n0:]})
        attack("score key: stats (any key)", 200, "GET", "/stats", "gateway")
        attack("read-state key: read state", (200, 404), "GET", f"/users/{u}/state", "ops")
        attack("open: health", 200, "GET", "/health", None)
        # input: internal ids, sizes, types, time order
        attack("internal id: score", 422, "POST", "/score", json={**tx0, "user_id": "\x00feedback"})
        attack("internal id: batch", 422, "POST", "/score/batch",
               json={"transactions": [{**tx0, "user_id": "\x00feedback"}]})
        attack("internal id: feedback", 422, "POST", "/feedback", json={**fb, "user_id": "\x00feedback"})
        attack("internal id: read state", 422, "GET", "/users/%00feedback/state")
        attack("internal store key as id: read state", 404, "GET", "/users/ps%3A1%3Ailog%3Afeedback/state")
        for mb in (19, 50):
            body = json.dumps({**tx0, values[0]: "x" * (mb << 20)}).encode()
            raw(f"a {mb} MB value", 413, [f"Content-Length: {len(body)}"],
                [body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20)])
        raw("19 MB chunked body", 413, ["Transfer-Encoding: chunked"],
            [b"100000\r\n" + b"x" * (1 << 20) + b"\r\n" for _ in range(19)] + [b"0\r\n\r\n"])
        raw("bad content-length", 400, ["Content-Length: abc"], [b"{}"])
        attack("batch of 1,000", (413, 422), "POST", "/score/batch", json={"transactions": [tx0] * 1000})
        small = {"user_id": "b", "timestamp": 0}
        attack("batch of 1,000 tiny", (413, 422), "POST", "/score/batch", json={"transactions": [small] * 1000})
        attack("batch of 257 tiny", 422, "POST", "/score/batch", json={"transactions": [small] * 257})
        raw("5 MB id: read state", (400, 413, 414, 422, 431, 0), [], [], f"GET /users/{'u' * (5 << 20)}/state")
        attack("5 MB id: feedback", 413, "POST", "/feedback", json={**fb, "user_id": "u" * (5 << 20)})
        attack("5 MB id: score", 413, "POST", "/score", json={**tx0, "user_id": "u" * (5 << 20)})
        attack("200-char unknown id: read state", 422, "GET", f"/users/{'n' * 200}/state")
        attack("100-char unknown id: read state 404", 404, "GET", f"/users/nobody-{'x' * 100}/state")
        attack("100-char unknown id: feedback 404", 404, "POST", "/feedback", json={**fb, "user_id": "n" * 100})
        attack("a first event", 200, "POST", "/score", json=tx0)
        back = {**tx0, "timestamp": (datetime.fromisoformat(tx0["timestamp"]) - timedelta(hours=1)).isoformat()}
        attack("an event going back in time", 409, "POST", "/score", json=back)
        attack("going back in a batch (refused inside)", 200, "POST", "/score/batch", json={"transactions": [back]})
        attack("true as a timestamp", 422, "POST", "/score", json={**tx0, "timestamp": True})
        attack("true as every value", 422, "POST", "/score", json={**tx0, **{k: True for k in values}})
        attack("NaN literal", 422, "POST", "/score", content=json.dumps({**tx0, "timestamp": float("nan")}).encode(),
               headers={"content-type": "application/json"})
        attack("5,000-char timestamp", 422, "POST", "/score", json={**tx0, "timestamp": "9" * 5000})
        attack("2**70 as every value", 422, "POST", "/score", json={**tx0, **{k: 2**70 for k in values}})
        attack("a lone surrogate as the id", (200, 422), "POST", "/score", json={**tx0, "user_id": "\ud800"})
        attack("a lone surrogate as a value", (200, 422), "POST", "/score",
               json={**tx0, "timestamp": "2099-01-01T00:00:00", values[0]: "\udfff"})
        client.close()

        # fuzz
        t = time.perf_counter()
        fuzz = asyncio.run(_fuzz(port, fuzz_requests(np.random.default_rng(args.seed), args.fuzz, txs)))
        fuzz["seconds"] = round(time.perf_counter() - t, 1)
        for counts in fuzz["by_endpoint"].values():
            statuses.update(counts)
        fuzz["server_alive"] = server.poll() is None
        fuzz["worker_processes_alive"] = len(descendants(server.pid))  # `--workers 1`: 1

        # restarts: SIGTERM, the store poisoned, start; kill -9, start
        restarts = {"sigterm_exit": stop(server)}
        user = next(t["user_id"] for t in txs[1:] if t["user_id"] != u)
        with open_store(url) as store:
            store.put_many({user: b"PSU\x01garbage"})  # a damaged state
            store.append_event(user, b"{not json")  # a damaged log entry
            store.append_event("\x00feedback", b'{"user_id": "x", "event_seq": 1, "label": 1}')  # the old internal key
            store.append_internal(FEEDBACK, b"[]")  # a damaged feedback record
        checks = []
        for i, how in enumerate(("after SIGTERM + poison", "after kill -9")):
            server = up(f"serve-restart{i}")
            auth = {"authorization": f"Bearer {TOKENS['all']}"}
            health = httpx.get(f"{base}/health", timeout=30).status_code
            stats = httpx.get(f"{base}/stats", headers=auth, timeout=30).json()
            late = "2099-12-31T23:59:59"  # the latest time taken: not older than any the fuzz gave this user
            score = httpx.post(f"{base}/score", json={**txs[1], "user_id": user, "timestamp": late},
                               headers=auth, timeout=60).status_code
            checks.append({"restart": how, "health": health, "score_poisoned_user": score,
                           "unreadable_records": stats["unreadable_records"]})
            if i == 0:
                restarts["kill9_exit"] = stop(server, signal.SIGKILL)
        restarts["checks"] = checks
        restart_ok = all(c["health"] == 200 and c["score_poisoned_user"] == 200 for c in checks)

    # a store claimed by another model, another run: refused at start-up, exit 2 (one line on stderr)
    identity = {}
    for what in ("model", "run"):
        url, _ = stores.sqlite(tmp / f"other-{what}")
        with open_store(url) as store:
            owner = read_owner(store)
            write_owner(store, owner["run_id"] if what == "model" else "another-run",
                        "panther@000000000000" if what == "model" else owner["model_version"])
        cmd = cli("serve", *stores.common(url), "--port", str(free_port()), *(["--migrate"] if what == "run" else []))
        try:
            done = subprocess.run(cmd, check=False, env=env(), capture_output=True, text=True, timeout=300)
            identity[what] = {"exit": done.returncode, "stderr": done.stderr.strip()[-300:]}
        except subprocess.TimeoutExpired:  # it served: not refused
            identity[what] = {"exit": None, "stderr": "still serving after 300 s"}
    n_5xx = sum(v for k, v in statuses.items() if k.startswith("5"))
    return {"requests": sum(statuses.values()), "status_5xx": n_5xx,
            "unauthenticated_status": unauth[0] if len(unauth) == 1 else unauth,
            "wrong_scope_status": wrong_scope[0] if len(wrong_scope) == 1 else wrong_scope,
            "restart_after_poison_ok": restart_ok, "store_of_another_model_exit": identity["model"]["exit"],
            "store_of_another_run_exit": identity["run"]["exit"], "fuzz_requests": args.fuzz,
            "attacks_as_expected": sum(a["ok"] for a in attacks), "attacks": len(attacks),
            "statuses": dict(sorted(statuses.items())),
            "details": {"attacks": attacks, "fuzz": fuzz, "restarts": restarts, "identity": identity,
                        "seed": args.seed}}


# -- replicas -----------------------------------------------------------------------------------------------
def run_replicas(args: argparse.Namespace, tx_file: Path, n_tx: int, tmp: Path, stores: Stores) -> dict:
    """tests/serve/test_replicas.py's protocol at `--replicas-k` transactions (see the module doc)."""
    import httpx

    from pantherseq.serve.scorer import Scorer
    from pantherseq.serve.service import Service
    from pantherseq.serve.state import UserState
    from pantherseq.store import open_store

    rows = read_tx(tx_file, 0, min(args.replicas_k, n_tx))
    shifted = [{**r, "timestamp": (datetime.fromisoformat(r["timestamp"]) + timedelta(days=8)).isoformat()}
               for r in rows]
    replay = [(tx, int(i % 4 == 0)) for i, tx in enumerate(rows + shifted)]
    with Procs(tmp) as procs:
        url0 = start_redis(procs)
        ref_url, url = url0.rsplit("/", 1)[0] + "/1", url0.rsplit("/", 1)[0] + "/2"
        embed_s = [stores.embed(u) for u in (ref_url, url)]

        # one process, refreshed after every event
        t = time.perf_counter()
        ref = Service(Scorer(args.run, args.model, args.fraud_dir), open_store(ref_url), refresh=False)
        ref.start()
        expected = []
        for tx, label in replay:
            out = ref.score(tx)
            ref.refresh_users([tx["user_id"]])
            if label:
                ref.feedback(tx["user_id"], out["event_seq"], 1)
            expected.append((out["score"], out["event_seq"], out["cold_start"], out["stale"]))
        ref.stop()
        ref.store.close()
        ref_s = time.perf_counter() - t

        # two scorer processes and one refresh worker: events alternate, labels go to the other process
        ports = [free_port(), free_port()]
        bases = [f"http://127.0.0.1:{p}" for p in ports]
        servers = [procs.start(f"serve{i}", cli("serve", *stores.common(url), "--port", str(p), x))
                   for i, (p, x) in enumerate(zip(ports, ("--external-refresh", "--workers=1")))]
        for b, s in zip(bases, servers):
            wait_http(f"{b}/health", s, log=s.log)
        t = time.perf_counter()
        got, errors, waited = [], 0, 0.0
        with open_store(url) as store, httpx.Client(timeout=60) as client:
            for i, (tx, label) in enumerate(replay):
                r = client.post(f"{bases[i % 2]}/score", json=tx)
                if r.status_code != 200:
                    errors += 1
                    got.append(None)
                    continue
                out = r.json()
                w = time.perf_counter()
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:  # the worker has folded this event into the user's state
                    blob = store.get_many([tx["user_id"]])[0]
                    if blob is not None and UserState.decode(blob).log_seq >= out["event_seq"]:
                        break
                    time.sleep(0.005)
                else:
                    errors += 1
                waited += time.perf_counter() - w
                if label:
                    fb = {"user_id": tx["user_id"], "event_seq": out["event_seq"], "label": 1}
                    errors += client.post(f"{bases[(i + 1) % 2]}/feedback", json=fb).status_code != 200
                got.append((out["score"], out["event_seq"], out["cold_start"], out["stale"]))
        rep_s = time.perf_counter() - t
    diffs = [abs(a[0] - b[0]) for a, b in zip(expected, got) if b is not None and None not in (a[0], b[0])]
    return {"processes": 2, "refresh_workers": 1, "requests": len(replay), "labels": sum(x for _, x in replay),
            "scores_identical": got == expected, "max_abs_diff": max(diffs, default=None),
            "mismatches": sum(a != b for a, b in zip(expected, got)), "errors": errors,
            "details": {"transactions": len(rows), "replayed_twice_8_days_apart": True, "embed_s": embed_s,
                        "one_process_s": round(ref_s, 1), "two_processes_s": round(rep_s, 1),
                        "waiting_for_refresh_s": round(waited, 1)}}


def main() -> None:
    if sys.argv[1:2] == ["--refresh-worker"]:
        sys.exit(refresh_worker_main(sys.argv[2], sys.argv[3:]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url"), ap.add_argument("--tx"), ap.add_argument("--mode")
    ap.add_argument("--n", type=int), ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--samples", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run", default=str(REPO / "runs" / "fraud-handbook" / "handbook"))
    ap.add_argument("--model", default="panther")
    ap.add_argument("--fraud-dir", help="default: RUN/fraud-MODEL (where benchmarks/fraud.py writes)")
    ap.add_argument("--until", default="2018-08-08")
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds at --rate before the fixed-rate phase counts")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the fixed-rate phase")
    ap.add_argument("--sat-seconds", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--scorers", type=int, default=2, help="scorer processes of the `scale` section")
    ap.add_argument("--soak-minutes", type=float, default=10.0, help="0 skips the soak")
    ap.add_argument("--soak-warmup", type=float, default=180.0,
                    help="seconds at --rate before the soak's RSS and minutes count: the scorer's and the worker's "
                         "caches, bounded in bytes, fill first (2.5 min in the 2026-12-02 run)")
    ap.add_argument("--soak-sample-s", type=float, default=5.0)
    ap.add_argument("--fuzz", type=int, default=10_000, help="random requests of the security section")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replicas-k", type=int, default=2000, help="transactions replayed (twice) by `replicas`")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="what to run; `sqlite:norefresh` serves without refresh, `B:thread` refreshes in-process")
    ap.add_argument("--out", default=str(RESULTS / "serve.json"))
    args = ap.parse_args()
    if args.load:
        return load_main(args)
    args.fraud_dir = args.fraud_dir or str(Path(args.run) / f"fraud-{args.model}")
    started = time.perf_counter()
    results: dict = {}
    sections = [s for s in args.sections.split(",") if s and not (s == "soak" and args.soak_minutes <= 0)]
    for s in sections:
        if s not in SECTIONS and s not in ("redis:norefresh", "sqlite:thread", "redis:thread"):
            raise SystemExit(f"unknown section {s!r}: {', '.join(SECTIONS)}, or B:norefresh / B:thread")
    with tempfile.TemporaryDirectory(prefix="pantherseq-serve-") as tmp:
        tx_file = Path(tmp) / "tx.jsonl"
        n_tx = transactions(Path(args.run), args.until, tx_file)
        stores = Stores(args, Path(tmp))
        for s in sections:
            d = Path(tmp) / s.replace(":", "_")
            d.mkdir()
            name = {"scale": "redis_scale"}.get(s, s.replace(":", "_"))
            t = time.perf_counter()
            if s.partition(":")[0] in ("sqlite", "redis"):
                results[name] = run_backend(s, args, tx_file, n_tx, d, stores)
            else:
                fn = {"scale": run_scale, "soak": run_soak, "security": run_security, "replicas": run_replicas}[s]
                results[name] = fn(args, tx_file, n_tx, d, stores)
            results[name]["section_s"] = round(time.perf_counter() - t, 1)
            print(f"{s}: {json.dumps({k: v for k, v in results[name].items() if k != 'details'})}", flush=True)
    results["command"] = " ".join([".venv/bin/python", "benchmarks/serve.py", *sys.argv[1:]])
    results["run"], results["model"] = args.run, args.model
    results["wall_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(format_table(results))
    print(f"-> {args.out}")


def format_table(results: dict) -> str:
    def f(x, w, p=2):
        return f"{x:>{w}.{p}f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else f"{'-':>{w}}"

    head = (f"{'store':<18}{'refresh':>11}{'rate':>6}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'srv p99':>9}"
            f"{'errors':>8}{'sat rps':>9}{'sat p99 ms':>12}{'lag p99 s':>11}")
    lines = []
    for b, r in results.items():
        if isinstance(r, dict) and "rate_rps" in r and "details" in r and "saturation" in r["details"] \
                and "refresh" in r:
            sat = r["details"]["saturation"]
            lines.append(f"{b:<18}{r['refresh']:>11}{r['rate_rps']:>6.0f}{f(r['p50_ms'], 9)}{f(r['p95_ms'], 9)}"
                         f"{f(r['p99_ms'], 9)}{f(r['server_p99_ms'], 9)}{r['errors']:>8d}"
                         f"{f(r['saturation_rps'], 9, 0)}{f(sat.get('p99_ms'), 12)}{f(r['refresh_lag_p99_s'], 11, 3)}")
    if "redis_scale" in results:
        r = results["redis_scale"]
        lines.append(f"{'redis x' + str(r['processes']) + ' scorers':<18}{'worker':>11}{'-':>6}{'-':>9}{'-':>9}"
                     f"{'-':>9}{f(r['server_p99_ms'], 9)}{r['errors']:>8d}{f(r['saturation_rps'], 9, 0)}"
                     f"{f(r['p99_ms'], 12)}{f(r['refresh_lag_p99_s'], 11, 3)}")
    if lines:
        lines[:0] = [head, "-" * len(head)]
    if "soak" in results:
        r = results["soak"]
        lines.append(f"soak: {r['minutes']:g} min at {r['rate_rps']:g} req/s on SQLite: RSS {r['rss_start_mb']} -> "
                     f"{r['rss_end_mb']} MB ({r['rss_growth_pct']:+.1f} %), p99 first / last minute "
                     f"{f(r['p99_ms_first_minute'], 0)} / {f(r['p99_ms_last_minute'], 0)} ms, {r['errors']} errors, "
                     f"refresh lag p99 {f(r['refresh_lag_p99_s'], 0, 3)} s")
    if "security" in results:
        r = results["security"]
        lines.append(f"security: {r['requests']:,} requests ({r['fuzz_requests']:,} fuzzed, {r['attacks']} attacks, "
                     f"{r['attacks_as_expected']} as expected): {r['status_5xx']} x 5xx; no key "
                     f"{r['unauthenticated_status']}, wrong scope {r['wrong_scope_status']}; restart after poison "
                     f"{'ok' if r['restart_after_poison_ok'] else 'FAILED'}; another model's / run's store: exit "
                     f"{r['store_of_another_model_exit']} / {r['store_of_another_run_exit']}")
    if "replicas" in results:
        r = results["replicas"]
        lines.append(f"replicas: {r['processes']} scorer processes + {r['refresh_workers']} worker vs one process, "
                     f"{r['requests']:,} requests ({r['labels']:,} labelled): identical "
                     f"{r['scores_identical']}, max |diff| {r['max_abs_diff']}, {r['errors']} errors")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
