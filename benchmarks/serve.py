"""Benchmark of `pantherseq serve` (issue 5): latency at a fixed rate and throughput at saturation, SQLite and
Redis stores, background refresh on, replaying the fraud handbook's test-period transactions in time order.

    .venv/bin/python benchmarks/serve.py [--run runs/fraud-handbook/handbook] [--model panther]
        [--fraud-dir RUN/fraud-panther] [--until 2018-08-08] [--rate 200] [--seconds 30]
        [--sat-seconds 20] [--concurrency 16] [--backends sqlite,redis] [--out benchmarks/results/serve.json]

Needs the run and risk model of `benchmarks/fraud.py`. For each backend: a fresh store, `pantherseq embed
--until` (states as of the test period's start), `pantherseq serve` in its own process, then a load generator
in another process (a minimal asyncio HTTP/1.1 keep-alive client on loopback): first open-loop at `--rate` requests/s for
`--seconds` (latency measured from each request's *scheduled* send time, so a slow server cannot hide its
queueing), then closed-loop with `--concurrency` connections for `--sat-seconds` (throughput at
saturation). Refresh lag (event appended -> its user's refreshed state written) comes from the service's
/stats for each phase. Redis runs as a real `redis-server` on a free loopback port with `appendonly yes`
(`appendfsync everysec`), its standard durable setting. Everything shares the machine's two cores.
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
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
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


# -- the load generator (a separate process: `serve.py --load ...`) ------------------------------------
# A minimal HTTP/1.1 keep-alive client on asyncio streams: requests are encoded before the clock starts and
# a response costs one header parse, so one client core drives the server well past its capacity (an httpx
# AsyncClient saturated its own core at ~120 requests/s here, below the server's capacity).
class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Conn:
        return cls(*await asyncio.open_connection(host, port))

    async def post(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def encode_requests(host: str, port: int, txs: list[dict]) -> list[bytes]:
    out = []
    for tx in txs:
        body = json.dumps(tx).encode()
        out.append(b"POST /score HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (host.encode(), port, len(body), body))
    return out


def _split_url(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    return host, int(port)


async def _open_loop(base: str, txs: list[dict], rate: float, pool_size: int = 64) -> dict:
    """Request i is due at t0 + i / rate; latency is measured from that due time (queueing included)."""
    host, port = _split_url(base)
    raws = encode_requests(host, port, txs)
    pool: asyncio.Queue[Conn] = asyncio.Queue()
    for _ in range(pool_size):
        pool.put_nowait(await Conn.open(host, port))
    lat, server, errors = [], [], 0
    t0 = time.perf_counter() + 0.2

    async def one(i: int) -> None:
        nonlocal errors
        due = t0 + i / rate
        conn = await pool.get()
        try:
            status, body = await conn.post(raws[i])
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            conn = await Conn.open(host, port)
        else:
            if status == 200:
                lat.append(time.perf_counter() - due)
                server.append(json.loads(body)["latency_ms"])
            else:
                errors += 1
        pool.put_nowait(conn)

    tasks = []
    for i in range(len(raws)):  # start each request at its time: only in-flight ones are pending
        await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    while not pool.empty():
        pool.get_nowait().close()
    return {"requests": len(txs), "ok": len(lat), "errors": errors, "wall_s": wall,
            "achieved_rps": len(lat) / wall, **_pct(lat, "ms", 1e3), **_pct(server, "server_ms", 1.0)}


async def _closed_loop(base: str, txs: list[dict], concurrency: int, seconds: float) -> dict:
    host, port = _split_url(base)
    raws = encode_requests(host, port, txs)
    lat, errors, nxt = [], 0, 0
    end = time.perf_counter() + seconds
    t0 = time.perf_counter()

    async def worker() -> None:
        nonlocal errors, nxt
        conn = await Conn.open(host, port)
        while time.perf_counter() < end and nxt < len(raws):
            raw = raws[nxt]
            nxt += 1
            s = time.perf_counter()
            try:
                status, _ = await conn.post(raw)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                conn = await Conn.open(host, port)
                continue
            if status == 200:
                lat.append(time.perf_counter() - s)
            else:
                errors += 1
        conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"requests": len(lat) + errors, "ok": len(lat), "errors": errors, "wall_s": wall,
            "saturation_rps": len(lat) / wall, **_pct(lat, "ms", 1e3)}


def _pct(values: list[float], unit: str, scale: float) -> dict:
    if not values:
        return {}
    a = np.asarray(values) * scale
    return {f"p{q}_{unit}": round(float(np.percentile(a, q)), 3) for q in (50, 95, 99)}


def load_main(args: argparse.Namespace) -> None:
    lines = Path(args.tx).read_text().splitlines()[args.offset:args.offset + args.n]
    txs = [json.loads(s) for s in lines]
    if args.mode == "rate":
        out = asyncio.run(_open_loop(args.url, txs, args.rate))
    else:
        out = asyncio.run(_closed_loop(args.url, txs, args.concurrency, args.seconds))
    print(json.dumps(out))


# -- the driver ----------------------------------------------------------------------------------------
def cli(*a: str) -> list[str]:
    return [sys.executable, "-m", "pantherseq.cli", *a]


def start_redis(tmp: Path) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found: `make setup` installs it (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp), "--save", "",
                             "--appendonly", "yes", "--appendfsync", "everysec"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    for _ in range(100):
        try:
            redis.Redis(port=port).ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def drained_stats(base: str, timeout: float = 300.0) -> dict:
    """The service's /stats once its refresh queue is empty (so every event of the phase has its lag
    recorded), then reset; `drain_s` says how long the queue took to empty after the load stopped."""
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if httpx.get(f"{base}/stats", timeout=30).json()["queue"] == 0:
            break
        time.sleep(0.1)
    st = httpx.get(f"{base}/stats", params={"reset": True}, timeout=30).json()
    return {**st, "drain_s": round(time.perf_counter() - t0, 2)}


def run_backend(backend: str, args: argparse.Namespace, tx_file: Path, n_tx: int, tmp: Path) -> dict:
    redis_proc = None
    backend, _, mode = backend.partition(":")  # "sqlite:norefresh": the request path alone, for comparison
    if backend == "sqlite":
        url = f"sqlite:///{tmp / 'serve.db'}"
    else:
        redis_proc, url = start_redis(tmp)
    common = ["--run", args.run, "--model", args.model, "--fraud-dir", args.fraud_dir, "--store", url]
    t = time.perf_counter()
    subprocess.run(cli("embed", *common, "--until", args.until), check=True, env=env())
    embed_s = time.perf_counter() - t
    port = free_port()
    extra = ["--no-refresh"] if mode == "norefresh" else []
    server = subprocess.Popen(cli("serve", *common, "--port", str(port), *extra), env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", server)

        n_rate = int(args.rate * args.seconds)
        if n_rate + 1000 > n_tx:
            raise SystemExit(f"only {n_tx} test transactions; lower --seconds")
        me = [sys.executable, __file__, "--load", "--url", base, "--tx", str(tx_file)]
        fixed = json.loads(subprocess.run([*me, "--mode", "rate", "--rate", str(args.rate), "--n", str(n_rate)],
                                          check=True, capture_output=True, text=True).stdout)
        lag_fixed = drained_stats(base)
        sat = json.loads(subprocess.run([*me, "--mode", "sat", "--concurrency", str(args.concurrency),
                                         "--seconds", str(args.sat_seconds), "--offset", str(n_rate),
                                         "--n", str(n_tx - n_rate)], check=True, capture_output=True,
                                        text=True).stdout)
        lag_sat = drained_stats(base)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
    return {"rate_rps": args.rate, "p50_ms": fixed.get("p50_ms"), "p95_ms": fixed.get("p95_ms"),
            "p99_ms": fixed.get("p99_ms"), "errors": fixed["errors"] + sat["errors"],
            "saturation_rps": round(sat["saturation_rps"], 1),
            "refresh_lag_p99_s": lag_fixed["refresh_lag_s"].get("p99"),
            "details": {"fixed_rate": fixed, "saturation": sat,
                        "refresh_fixed_rate": {**lag_fixed["refresh_lag_s"], "refreshed": lag_fixed["refreshed"],
                                               "queue_left": lag_fixed["queue"], "drain_s": lag_fixed["drain_s"]},
                        "refresh_saturation": {**lag_sat["refresh_lag_s"], "refreshed": lag_sat["refreshed"],
                                               "queue_left": lag_sat["queue"], "drain_s": lag_sat["drain_s"]}, "embed_s": round(embed_s, 1),
                        "users_embedded": lag_fixed["embed"].get("users"), "store": url.split(":")[0]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url"), ap.add_argument("--tx"), ap.add_argument("--mode")
    ap.add_argument("--n", type=int), ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--run", default=str(REPO / "runs" / "fraud-handbook" / "handbook"))
    ap.add_argument("--model", default="panther")
    ap.add_argument("--fraud-dir", help="default: RUN/fraud-MODEL (where benchmarks/fraud.py writes)")
    ap.add_argument("--until", default="2018-08-08")
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the fixed-rate phase")
    ap.add_argument("--sat-seconds", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--backends", default="sqlite,redis,sqlite:norefresh",
                    help="stores to measure; `sqlite:norefresh` serves without the background refresh")
    ap.add_argument("--out", default=str(RESULTS / "serve.json"))
    args = ap.parse_args()
    if args.load:
        return load_main(args)
    args.fraud_dir = args.fraud_dir or str(Path(args.run) / f"fraud-{args.model}")
    started = time.perf_counter()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="pantherseq-serve-") as tmp:
        tx_file = Path(tmp) / "tx.jsonl"
        n_tx = transactions(Path(args.run), args.until, tx_file)
        for b in [b for b in args.backends.split(",") if b]:
            d = Path(tmp) / b.replace(":", "_")
            d.mkdir()
            results[b.replace(":", "_")] = run_backend(b, args, tx_file, n_tx, d)
            r = results[b.replace(":", "_")]
            print(f"{b}: {json.dumps({k: v for k, v in r.items() if k != 'details'})}", flush=True)
    results["command"] = " ".join([".venv/bin/python", "benchmarks/serve.py", *sys.argv[1:]])
    results["run"], results["model"] = args.run, args.model
    results["wall_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(format_table(results))
    print(f"-> {args.out}")


def format_table(results: dict) -> str:
    head = (f"{'store':<18}{'rate':>6}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}{'sat rps':>9}"
            f"{'sat p99 ms':>12}{'lag p99 s':>11}")
    lines = [head, "-" * len(head)]
    for b, r in results.items():
        if not isinstance(r, dict) or "rate_rps" not in r:
            continue
        sat = r["details"]["saturation"]

        def f(x, w, p=2):
            return f"{x:>{w}.{p}f}" if isinstance(x, (int, float)) else f"{'-':>{w}}"

        lines.append(f"{b:<18}{r['rate_rps']:>6.0f}{f(r['p50_ms'], 9)}{f(r['p95_ms'], 9)}{f(r['p99_ms'], 9)}"
                     f"{r['errors']:>8d}{f(r['saturation_rps'], 9, 0)}{f(sat.get('p99_ms'), 12)}"
                     f"{f(r['refresh_lag_p99_s'], 11, 3)}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
