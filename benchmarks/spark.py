"""Benchmark of the Spark engine against one process (issue 15): `prepare` and `embed` on the fraud handbook,
and `scale`: 20M simulated events.

    .venv/bin/python benchmarks/spark.py [--data ../shared/data] [--master local[2]] [--shards 1]
                                         [--only handbook|embed|scale] [--out benchmarks/results/spark.json]
                                         [--scale-events 20000000] [--scale-shards 32] [--driver-memory 768m]
                                         [--train-budget-s 300] [--single-cap-mb 8000] [--tmp DIR]

Runs `pantherseq prepare --dataset handbook` twice in fresh processes, once per engine, into temporary run
directories, times each (wall time of the whole process, JVM start included for Spark, and each
process's peak RSS: for Spark the driver's Python; the JVM is a child process), then compares every
output: prepare.json (all keys but wall_s), tokenizer.json, every sequences array, events.parquet and
users.parquet. Asserts 0 token mismatches and writes the `handbook` entry of benchmarks/results/spark.json.

The `embed` part prepares the handbook (Polars), pretrains a tiny `panther` (EMBED_MODEL: d_model 32, one
layer, one epoch), then runs `pantherseq embed` in one process and `embed --engine spark` (the same master)
into two SQLite stores, each a fresh process, and compares every user's state: the max |difference| of `h`
and `pooled` (asserted <= 1e-6; `top_p` and `recent_delta` reported too) and each engine's users/s (users
over the `seconds` the store's `embed` meta records: the embed itself, the Spark session's start included;
each process's wall time too). It writes the `embed` entry.

The `scale` part (the issue's 20M-event test) writes `--scale-events` simulated events as Parquet files under
`--tmp` (`write_simulated`: one simulator world of 4,000 users, about 1.1M events, per file, seed = the
file's number, ids prefixed by it, so the generator holds one file at a time and the data is reproducible),
with the built-in `simulated` config read back as a `csv` source (`scale_config`: the same fields, split and
profile; `--scale-shards` shards; `spark.driver.memory` = `--driver-memory`, one shuffle partition per shard).
Then, each in a fresh process whose process tree is polled every 0.5 s (`measured`: per process the kernel's
own peak, VmHWM, and the tree's summed RSS):
1. `prepare --engine spark --spark-master MASTER` into the shards: wall time, Spark's per-step seconds (its log)
   and `driver_peak_mb` = the driver's Python (the `pantherseq` process) + its JVM (a child; on a local master
   the JVM is the executor too), each at its own peak, so an upper bound of their peak together; the Python
   workers the JVM starts are reported apart (`spark.peak_mb.python_workers`);
2. `pretrain` of a tiny `panther` (SCALE_MODEL) on that run, streaming its shards, for one epoch cut by
   `train.time_budget_s = --train-budget-s`: `train_peak_mb` is the process's peak RSS (metrics.json's
   `peak_mb`, VmHWM as polled), with the steps taken and how many shards they came from;
3. the one-process `prepare` (Polars) of the same files, killed once its RSS passes `--single-cap-mb` (it
   holds every event in memory): `single_process_peak_mb` is its peak, and `single_process.completed` /
   `killed_at` (seconds, RSS and the last log line) say whether and where it stopped; when it completes, its
   prepare.json (but wall_s) and tokenizer.json are compared with Spark's.
The data and runs are removed at the end. `--only` runs one part and keeps the file's other entries;
`--out` writes elsewhere (a smoke run: `--only scale --scale-events 300000 --scale-shards 8`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "spark.json"
ARRAYS = ("offsets", "tokens", "codes", "time", "gap", "label", "scenario", "split")
EMBED_MODEL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_prototypes=16", "train.epochs=1",
               "train.eval_max_users=200", "train.threads=2"]
TOLERANCE = 1e-6


def pantherseq(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    """`pantherseq ARGS` in a fresh process: (the finished process, its wall time in s); exits on failure."""
    started = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "pantherseq"), *args], check=False,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pantherseq {' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
    return proc, round(time.perf_counter() - started, 2)


def _states(url: str, users: list[str]) -> tuple[dict, dict]:
    """(the store's `embed` meta, user_id -> UserState)."""
    from pantherseq.serve.state import UserState
    from pantherseq.store import open_store

    with open_store(url) as store:
        meta = json.loads(store.get_meta("embed"))
        got = store.get_many(users)
    return meta, {u: UserState.decode(v) for u, v in zip(users, got) if v is not None}


def _max_diff(a: dict, b: dict, name: str) -> float:
    worst = 0.0
    for user, x in a.items():
        u, v = np.asarray(getattr(x, name), np.float64), np.asarray(getattr(b[user], name), np.float64)
        if u.shape != v.shape or not np.array_equal(np.isnan(u), np.isnan(v)):
            return float("inf")
        if u.size:
            worst = max(worst, float(np.nanmax(np.abs(u - v), initial=0.0)))
    return worst


def run_embed(data: Path, tmp: Path, master: str, shards: int) -> dict:
    """The `embed` part (module doc)."""
    run = tmp / "run"
    _, prepare_s = pantherseq("prepare", "--dataset", "handbook", "--data", str(data), "--out", str(run),
                              "--set", f"sequences.shards={shards}")
    sets = [a for kv in EMBED_MODEL for a in ("--set", kv)]
    _, pretrain_s = pantherseq("pretrain", "--run", str(run), "--model", "panther", *sets)
    one, spark = f"sqlite:///{tmp / 'single.db'}", f"sqlite:///{tmp / 'spark.db'}"
    _, single_wall = pantherseq("embed", "--run", str(run), "--store", one)
    _, spark_wall = pantherseq("embed", "--run", str(run), "--store", spark, "--engine", "spark",
                               "--spark-master", master, "--states-parquet", str(tmp / "states.parquet"))
    users = pl.read_parquet(run / "users.parquet")["user_id"].cast(pl.Utf8).to_list()
    (m1, a), (m2, b) = _states(one, users), _states(spark, users)
    if a.keys() != b.keys() or len(a) != m1["users"] or len(b) != m2["users"]:
        raise SystemExit(f"the engines embedded different users: {len(a)} vs {len(b)}")
    diffs = {name: _max_diff(a, b, name) for name in ("h", "pooled", "top_p", "recent_delta")}
    same_ids = all(np.array_equal(x.top_ids, b[u].top_ids) and np.array_equal(x.tokens, b[u].tokens)
                   for u, x in a.items())
    return {"users": len(a), "max_abs_diff": max(diffs["h"], diffs["pooled"]), "max_abs_diff_by_field": diffs,
            "windows_and_top_ids_equal": same_ids, "tolerance": TOLERANCE,
            "single_users_per_s": round(len(a) / m1["seconds"], 1),
            "spark_users_per_s": round(len(b) / m2["seconds"], 1),
            "single_embed_s": m1["seconds"], "spark_embed_s": m2["seconds"], "single_process_wall_s": single_wall,
            "spark_process_wall_s": spark_wall, "spark_local": master, "shards": shards,
            "recent_delta_rows": sum(len(x.recent_delta) for x in a.values()),
            "model": "panther " + " ".join(EMBED_MODEL), "prepare_s": prepare_s, "pretrain_s": pretrain_s}


def run_prepare(data: Path, out: Path, engine: str, master: str, shards: int) -> dict:
    cmd = [str(Path(sys.executable).parent / "pantherseq"), "-v", "prepare", "--dataset", "handbook",
           "--data", str(data), "--out", str(out), "--engine", engine, "--set", f"sequences.shards={shards}"]
    if engine == "spark":
        cmd += ["--spark-master", master]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{engine} prepare failed:\n{proc.stderr[-3000:]}")
    steps = [line.split("spark prepare: ", 1)[1] for line in proc.stderr.splitlines() if "spark prepare: " in line]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(max(peak, before) / 1024, 1), "steps": steps}


def compare(a: Path, b: Path) -> dict:
    """Mismatch counts between two run directories (0 everywhere = identical)."""
    from pantherseq.data.sequences import Sequences

    ja, jb = (json.loads((p / "prepare.json").read_text()) for p in (a, b))
    report_keys = [k for k in ja if k != "wall_s" and ja[k] != jb.get(k)]
    tokenizer_same = json.loads((a / "tokenizer.json").read_text()) == json.loads((b / "tokenizer.json").read_text())
    sa, sb = Sequences.load(a / "sequences"), Sequences.load(b / "sequences")
    arrays = {}
    for name in ARRAYS:
        x, y = np.asarray(getattr(sa, name)), np.asarray(getattr(sb, name))
        same_nan = np.isnan(x) & np.isnan(y) if x.dtype.kind == "f" else np.zeros(x.shape, bool)
        arrays[name] = int(x.size + y.size) if x.shape != y.shape else int(((x != y) & ~same_nan).sum())
    tables = {name: pl.read_parquet(a / name).equals(pl.read_parquet(b / name))
              for name in ("events.parquet", "users.parquet")}
    return {"rows": sa.n_events, "token_mismatches": arrays["tokens"], "array_mismatches": arrays,
            "report_keys_differing": report_keys, "tokenizer_identical": tokenizer_same, "tables_identical": tables}


def run_handbook(data: Path, master: str, shards: int) -> dict:
    """The `prepare` part (module doc)."""
    with tempfile.TemporaryDirectory() as tmp:
        polars = run_prepare(data, Path(tmp) / "polars", "polars", master, shards)
        spark = run_prepare(data, Path(tmp) / "spark", "spark", master, shards)
        diff = compare(Path(tmp) / "polars", Path(tmp) / "spark")
    ok = (diff["token_mismatches"] == 0 and not any(diff["array_mismatches"].values())
          and not diff["report_keys_differing"] and diff["tokenizer_identical"] and all(diff["tables_identical"].values()))
    result = {"rows": diff["rows"], "token_mismatches": diff["token_mismatches"],
              "polars_wall_s": polars["wall_s"], "spark_wall_s": spark["wall_s"],
              "ratio": round(spark["wall_s"] / polars["wall_s"], 2), "spark_local": master,
              "shards": shards, "identical": ok, "compare": diff,
              "polars_peak_rss_mb": polars["peak_rss_mb"], "spark_steps": spark["steps"]}
    print(f"handbook {diff['rows']:,} events: polars {polars['wall_s']:.1f} s, spark {master} "
          f"{spark['wall_s']:.1f} s ({result['ratio']}x); token mismatches {diff['token_mismatches']}; "
          f"identical run directories: {ok}")
    print("spark steps: " + "; ".join(spark["steps"]))
    if not ok:
        raise SystemExit(f"the engines differ: {json.dumps(diff)}")
    return result


# -- scale: 20M simulated events, Spark prepare, streamed training, the one-process prepare ------------------
SCALE_USERS_PER_FILE = 4000  # one simulator world per file: about 1.1M events (278 a user over its 120 days)
EVENTS_PER_USER = 278  # the simulator's default 120 days, measured: sizes the files of a smaller --scale-events
SCALE_MODEL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_prototypes=16",
               "train.epochs=1", "train.eval_max_users=200", "train.threads=2", "train.log_every=10"]
POLL_S = 0.5


def write_simulated(folder: Path, events: int) -> dict:
    """About `events` simulated events as Parquet files, one simulator world (seed b) per file `events-b.parquet`:
    user, merchant and event ids prefixed `bNNN` (the worlds are independent), times as epoch seconds; the last
    file cut to whole users so the total is at most `events`. profile.parquet: every kept user's profile."""
    from pantherseq.data.schema import SimulateConfig
    from pantherseq.data.simulate import simulate

    folder.mkdir(parents=True)
    per_file = max(50, min(SCALE_USERS_PER_FILE, -(-events // (EVENTS_PER_USER * 4))))  # >= 4 files when small
    started, total, profiles, batch = time.perf_counter(), 0, [], 0
    while total < events:
        sim = simulate(SimulateConfig(n_users=per_file, seed=batch))
        ev, tag = sim.events, f"b{batch:03d}"
        counts = ev.group_by("user_id", maintain_order=True).len()
        keep = counts.filter(pl.col("len").cum_sum() <= events - total)["user_id"]
        if keep.len() < counts.height:
            ev = ev.filter(pl.col("user_id").is_in(keep.implode()))
        if ev.height == 0:
            break
        ids = [pl.concat_str(pl.lit(tag), pl.col(c)).alias(c) for c in ("user_id", "merchant_id", "event_id")]
        ev.with_columns(*ids, pl.col("timestamp").dt.epoch("s")).write_parquet(folder / f"events-{batch:03d}.parquet")
        profiles.append(sim.profile.filter(pl.col("user_id").is_in(keep.implode()))
                        .with_columns(pl.concat_str(pl.lit(tag), pl.col("user_id")).alias("user_id")))
        total += ev.height
        batch += 1
        del sim, ev
    profile = pl.concat(profiles)
    profile.write_parquet(folder / "profile.parquet")
    return {"events": total, "users": profile.height, "files": batch, "users_per_file": per_file,
            "bytes": sum(p.stat().st_size for p in folder.iterdir()), "wall_s": round(time.perf_counter() - started, 1),
            "seeds": f"0..{batch - 1}"}


def scale_config(data: Path, shards: int, driver_memory: str) -> dict:
    """The built-in `simulated` config read back from the files as a `csv` source (the same fields, split,
    profile), `shards` shards, the Spark driver's memory and one shuffle partition per shard (at least 8)."""
    from pantherseq.config import load_toml
    from pantherseq.data.schema import builtin_config_path

    raw = load_toml(builtin_config_path("simulated"))
    raw.pop("simulate", None)
    raw.update(name="simulated-scale", source="csv", format="parquet", data=str(data / "events-*.parquet"))
    raw["columns"] = {"user_id": "user_id", "timestamp": "timestamp", "time_format": "epoch_s", "label": "label",
                      "scenario": "scenario", "event_id": "event_id"}
    raw["profile"] = {**raw.get("profile", {}), "path": str(data / "profile.parquet"), "key": "user_id"}
    raw["sequences"] = {"shards": shards}
    raw["spark"] = {"conf": {"spark.driver.memory": driver_memory,
                             "spark.sql.shuffle.partitions": str(max(8, shards))}}
    return raw


def _proc_table() -> dict[int, int]:
    """pid -> parent pid of every process."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parents[int(text.split(" ", 1)[0])] = int(text.rsplit(")", 1)[1].split()[1])
    return parents


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in _proc_table().items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _kind(pid: int, root: int) -> str:
    if pid == root:
        return "driver_python"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "other"
    if argv and argv[0].endswith(b"java"):
        return "jvm"
    return "python_workers" if any(b"pyspark" in a for a in argv) else "other"


def _memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB; (0, 0) once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0, 0
    got = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines if line.startswith(("VmRSS", "VmHWM")))}
    return got.get("VmRSS", 0), got.get("VmHWM", 0)


def measured(cmd: list[str], log: Path, cap_mb: float | None = None) -> dict:
    """Run `cmd` (its own process group, output to `log`) and poll its process tree every POLL_S s.

    Kinds of process: driver_python (the command's own process), jvm, python_workers (PySpark's daemons and
    workers), other. Returns wall_s, rc, `process_peak_mb` per kind: the largest VmHWM of one process (the
    kernel's exact peak of that process, read until its last poll; for a command that starts no process, its
    ru_maxrss at exit, exact); `sampled_peak_mb` per kind, for
    driver_python+jvm and for the whole tree: the largest sum of VmRSS at one poll (jvm: the largest java
    process; forked Python workers count the pages they share with their daemon once each); `timeline`:
    (s, RSS MB by kind) every 10 s and at each tree peak 5 % above the last; each log line with the seconds
    and RSS by kind when it appeared; with `cap_mb`, `killed_at` (the tree killed once its sampled RSS passed
    the cap)."""
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    hwm: dict[int, tuple[str, int]] = {}
    sampled: dict[str, int] = {}
    lines, timeline, killed, pos = [], [], None, 0
    while True:
        done, status, usage = os.wait4(proc.pid, os.WNOHANG)
        by_kind: dict[str, int] = {}
        for pid in ([] if done else _tree(proc.pid)):
            rss, peak = _memory_kb(pid)
            kind = _kind(pid, proc.pid)
            # one JVM: a child it is spawning shows the JVM's own pages for a moment (not summed)
            by_kind[kind] = max(by_kind.get(kind, 0), rss) if kind == "jvm" else by_kind.get(kind, 0) + rss
            hwm[pid] = (kind, max(peak, hwm.get(pid, (kind, 0))[1]))
        by_kind["driver_python+jvm"] = by_kind.get("driver_python", 0) + by_kind.get("jvm", 0)
        total = sum(v for k, v in by_kind.items() if k != "driver_python+jvm")
        now = round(time.perf_counter() - started, 1)
        rss_mb = {k: round(v / 1024) for k, v in sorted(by_kind.items()) if k != "other"}
        if not done and (not timeline or now - timeline[-1]["s"] >= 10 or total > 1.05 * sampled.get("tree", 0)):
            timeline.append({"s": now, "rss_mb": rss_mb, "tree_mb": round(total / 1024)})
        for kind, kb in [*by_kind.items(), ("tree", total)]:
            sampled[kind] = max(sampled.get(kind, 0), kb)
        with open(log, "rb") as fh:
            fh.seek(pos)
            new = fh.read()
        cut = new.rfind(b"\n") + 1
        pos += cut
        lines += [{"s": now, "rss_mb": rss_mb, "line": x.decode(errors="replace")[:300]}
                  for x in new[:cut].splitlines() if x.strip()]
        if done:
            break
        if cap_mb is not None and total / 1024 > cap_mb and killed is None:
            killed = {"s": now, "tree_rss_mb": round(total / 1024), "last_line": lines[-1]["line"] if lines else ""}
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(POLL_S)
    proc.returncode = os.waitstatus_to_exitcode(status)
    peaks: dict[str, int] = {}
    for kind, peak in hwm.values():
        peaks[kind] = max(peaks.get(kind, 0), peak)
    if set(hwm) <= {proc.pid}:  # one process: the kernel's peak at its exit (a short one ends between polls)
        peaks["driver_python"] = max(peaks.get("driver_python", 0), usage.ru_maxrss)
    return {"wall_s": round(time.perf_counter() - started, 1), "rc": proc.returncode,
            "process_peak_mb": {k: round(v / 1024, 1) for k, v in sorted(peaks.items())},
            "sampled_peak_mb": {k: round(v / 1024, 1) for k, v in sorted(sampled.items())},
            "timeline": timeline, "killed_at": killed, "log": lines}


def _folder_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def _shards_read(run: Path, name: str, steps: int) -> int:
    """How many shards the first `steps` training batches of models/NAME came from (ShardStream's order of
    epoch 0, with the batch size, max_len and seed of its pretrain.toml)."""
    from pantherseq.config import load_toml
    from pantherseq.data.shards import ShardStream
    from pantherseq.run import RunDir

    cfg = load_toml(RunDir(run).pretrain_config(name))
    batch_size, max_len, seed = cfg["train"]["batch_size"], cfg["model"]["max_len"], cfg["train"]["seed"] * 1000
    stream = ShardStream(run / "sequences", None)
    sizes = [-(-len(w) // batch_size) for w in stream.windows(max_len + 1)]
    order = np.random.default_rng(seed).permutation(stream.shards).tolist()
    ends = np.cumsum([sizes[s] for s in order])
    return int(np.searchsorted(ends, steps, side="left")) + 1 if steps else 0


def _check(result: dict, what: str, log: Path) -> None:
    if result["rc"] != 0:
        tail = "\n".join(x["line"] for x in result["log"][-30:])
        raise SystemExit(f"{what} failed (rc {result['rc']}; log {log}):\n{tail}")


def run_scale(tmp: Path, master: str, events: int, shards: int, driver_memory: str, train_budget_s: float,
              cap_mb: float | None) -> dict:
    """The `scale` part (module doc)."""
    import tomli_w

    exe = str(Path(sys.executable).parent / "pantherseq")
    data = write_simulated(tmp / "data", events)
    print(f"scale: {data['events']:,} events of {data['users']:,} users in {data['files']} Parquet files "
          f"({data['bytes'] / 2**20:,.0f} MB, {data['wall_s']:.0f} s)", flush=True)
    config = tmp / "scale.toml"
    config.write_text(tomli_w.dumps(scale_config(tmp / "data", shards, driver_memory)))
    prepare = [exe, "prepare", "--dataset", "csv", "--config", str(config)]
    spark_run = tmp / "spark"
    spark = measured([*prepare, "--out", str(spark_run), "--engine", "spark", "--spark-master", master],
                     tmp / "spark.log")
    _check(spark, "spark prepare", tmp / "spark.log")
    steps = {}
    for x in spark["log"]:
        if "spark prepare: " in x["line"]:
            step, secs = x["line"].split("spark prepare: ", 1)[1].rsplit(" ", 2)[:2]
            steps[step] = float(secs)
    report = json.loads((spark_run / "prepare.json").read_text())
    peak = spark["process_peak_mb"]
    driver = peak.get("driver_python", 0) + peak.get("jvm", 0)
    print(f"scale: spark prepare {spark['wall_s']:.0f} s, driver {driver:,.0f} MB (python "
          f"{peak.get('driver_python', 0):,.0f} + JVM {peak.get('jvm', 0):,.0f}; together at one poll "
          f"{spark['sampled_peak_mb'].get('driver_python+jvm', 0):,.0f}); "
          f"steps {steps}", flush=True)
    seq = spark_run / "sequences"
    shard_mb = [_folder_mb(p) for p in sorted(seq.glob("shard-*"))] or [_folder_mb(seq)]

    sets = [a for kv in [*SCALE_MODEL, f"train.time_budget_s={train_budget_s}"] for a in ("--set", kv)]
    train = measured([exe, "pretrain", "--run", str(spark_run), "--model", "panther", *sets], tmp / "pretrain.log")
    _check(train, "pretrain", tmp / "pretrain.log")
    metrics = json.loads((spark_run / "models" / "panther" / "metrics.json").read_text())
    shards_read = _shards_read(spark_run, "panther", metrics["steps"])
    train_peak = max(metrics["peak_mb"], train["process_peak_mb"].get("driver_python", 0))
    print(f"scale: pretrain {metrics['steps']} steps from {shards_read} of {shards} shards, peak {train_peak:,.0f} MB "
          f"({train['wall_s']:.0f} s)", flush=True)

    single_run = tmp / "single"
    single = measured([*prepare, "--out", str(single_run)], tmp / "single.log", cap_mb=cap_mb)
    completed = single["rc"] == 0
    if not completed and single["killed_at"] is None:
        _check(single, "the one-process prepare", tmp / "single.log")
    same = None
    if completed:
        other = json.loads((single_run / "prepare.json").read_text())
        same = ({k: v for k, v in other.items() if k != "wall_s"} == {k: v for k, v in report.items() if k != "wall_s"}
                and (single_run / "tokenizer.json").read_text() == (spark_run / "tokenizer.json").read_text())
    single_peak = single["process_peak_mb"].get("driver_python", 0)
    print(f"scale: one-process prepare {'done' if completed else 'stopped at the cap'} after {single['wall_s']:.0f} s, "
          f"peak {single_peak:,.0f} MB" + ("" if completed else f": {single['killed_at']}"), flush=True)
    shutil.rmtree(single_run, ignore_errors=True)
    return {
        "events": report["rows_kept"], "shards": shards, "spark_wall_s": spark["wall_s"],
        "driver_peak_mb": round(driver, 1), "train_peak_mb": round(train_peak, 1),
        "single_process_peak_mb": round(single_peak, 1),
        "data": {**data, "users_kept": report["users"], "vocab_size": report["vocab_size"]},
        "spark": {"master": master, "driver_memory": driver_memory,
                  "shuffle_partitions": max(8, shards), "steps_s": steps, "process_peak_mb": spark["process_peak_mb"],
                  "sampled_peak_mb": spark["sampled_peak_mb"], "timeline": spark["timeline"], "sequences_mb": _folder_mb(seq),
                  "shard_mb_max": max(shard_mb), "events_parquet_mb": round((spark_run / "events.parquet").stat()
                                                                            .st_size / 2**20, 1)},
        "train": {"model": "panther " + " ".join(SCALE_MODEL), "time_budget_s": train_budget_s,
                  "steps": metrics["steps"], "shards_read": shards_read, "train_s": metrics["train_s"],
                  "train_events_per_s": metrics["train_events_per_s"], "wall_s": train["wall_s"],
                  "metrics_peak_mb": metrics["peak_mb"], "process_peak_mb": train["process_peak_mb"],
                  "valid_ndcg@10": metrics["valid"].get("ndcg@10")},
        "single_process": {"completed": completed, "wall_s": single["wall_s"], "cap_mb": cap_mb,
                           "process_peak_mb": single["process_peak_mb"], "timeline": single["timeline"],
                           "killed_at": single["killed_at"], "same_report_and_tokenizer_as_spark": same,
                           "log": [x for x in single["log"] if " INFO " in x["line"] or "error" in x["line"]][-12:]},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--only", choices=("handbook", "embed", "scale"), help="run one part; the file's other entries are kept")
    ap.add_argument("--out", default=str(RESULTS), help="the results file (read, merged, written)")
    ap.add_argument("--scale-events", type=int, default=20_000_000, help="scale: simulated events (fewer to smoke-test)")
    ap.add_argument("--scale-shards", type=int, default=32, help="scale: sequences.shards")
    ap.add_argument("--driver-memory", default="768m", help="scale: spark.driver.memory (the local JVM's heap)")
    ap.add_argument("--train-budget-s", type=float, default=300.0, help="scale: pretrain's train.time_budget_s")
    ap.add_argument("--single-cap-mb", type=float, default=8000.0,
                    help="scale: the one-process prepare is killed when its RSS passes this (0: no cap)")
    ap.add_argument("--tmp", default=None, help="scale: where the data and runs go (default: the system's temp dir)")
    args = ap.parse_args()
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    if args.only in (None, "handbook", "embed"):
        data = Path(args.data) / "fraud-handbook"
        if not data.is_dir():
            raise SystemExit(f"{data} not found: pass --data with the shared data folder")
    if args.only in (None, "handbook"):
        result["handbook"] = run_handbook(data, args.master, args.shards)
    if args.only in (None, "embed"):
        with tempfile.TemporaryDirectory() as tmp:
            e = result["embed"] = run_embed(data, Path(tmp), args.master, args.shards)
        print(f"embed {e['users']:,} users: one process {e['single_users_per_s']:,.1f} users/s "
              f"({e['single_embed_s']:.1f} s), spark {args.master} {e['spark_users_per_s']:,.1f} users/s "
              f"({e['spark_embed_s']:.1f} s); max |diff| h/pooled {e['max_abs_diff']:.2e} "
              f"(by field {e['max_abs_diff_by_field']})")
        if not e["max_abs_diff"] <= TOLERANCE or not e["windows_and_top_ids_equal"]:
            raise SystemExit(f"the engines' states differ: {json.dumps(e)}")
    if args.only in (None, "scale"):
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            result["scale"] = run_scale(Path(tmp), args.master, args.scale_events, args.scale_shards,
                                        args.driver_memory, args.train_budget_s, args.single_cap_mb or None)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
