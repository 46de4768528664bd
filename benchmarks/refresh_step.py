"""The refresh's cost per event (issue 14): the full-window forward against the incremental update
(serve/windows.py), side by side in one process, one thread, on a run it prepares itself on the simulator.

    .venv/bin/python benchmarks/refresh_step.py [--work runs/refresh-step] [--users 300] [--models panther,transformer]
        [--budget-s 20] [--events 1500] [--warmup 900] [--batches 1,64] [--out benchmarks/results/refresh_step.json]

Prepare: the simulator (`--users` users, its default 120 days), each model pretrained for `--budget-s`
seconds at the default shape (d 64, 2 layers, max_len 128; how well it is trained does not change the
cost). Then, per model: every user's state embedded as of the test period's start (`embed`'s code), and
the test period's first `--warmup` + `--events` events replayed in time order, folded into their users'
states in rounds of `--batches` events (the refresh worker takes up to 64 queued users at a time; 1 = a
refresh per event). In each round, on the same states, the model's states are computed both ways —
`Scorer.window_states` (one batched float64 forward over each user's window, as before) and
`Windows.states` (each cached window extended by its new events; misses batched) — and the rest of the
refresh (the next-event distribution, top-k) once; the two paths' h are compared. The window is the
service's with the fraud default `context` = 100 (re-based every 28 events). The first `--warmup` events
fill the cache and are not timed. Prints ms per event (median over rounds) and events/s (all timed events
over the total time) and writes benchmarks/results/refresh_step.json. These machines are shared and noisy:
quote the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MODEL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.max_len=128", "model.dropout=0.1"]


def prepare_run(work: Path, users: int, models: list[str], budget_s: float) -> Path:
    """The simulated run with each model trained (kept and reused when it is there)."""
    from pantherseq.data.schema import load_dataset_config
    from pantherseq.prepare import prepare
    from pantherseq.train.loop import load_pretrain_config, train

    run = work / "simulated"
    if not (run / "prepare.json").is_file():
        prepare(load_dataset_config("simulated", None, [f"simulate.n_users={users}"]), run, force=True)
    for name in models:
        if not (run / "models" / name).is_dir():
            train(run, name, load_pretrain_config(None, [*MODEL, f"train.time_budget_s={budget_s}", "train.epochs=2",
                                                         "train.threads=1", "train.eval_max_users=100"], model=name))
    return run


def replay(scorer, seq, events: np.ndarray, user_of: np.ndarray, states: dict, ids: list[str], batch: int,
           warmup: int) -> dict:
    """Rounds of `batch` events (flat ids, time order): fold, then the states both ways, timed (see the doc)."""
    from pantherseq.data.dataset import gap_buckets

    gaps = gap_buckets(np.asarray(seq.gap, dtype=np.float64))
    per: dict[str, list[float]] = {"full": [], "incremental": [], "rest": []}
    total = {k: 0.0 for k in per}
    timed, worst = 0, 0.0
    hits0 = misses0 = None
    for i in range(0, len(events), batch):
        if i >= warmup and hits0 is None:  # the first timed round
            hits0, misses0 = scorer.model_windows.hits, scorer.model_windows.misses
        part = events[i:i + batch]
        users = list(dict.fromkeys(ids[user_of[j]] for j in part))
        for j in part:
            u = ids[user_of[j]]
            states[u] = scorer.fold(states[u], [(int(j) + 1, {
                "time": int(seq.time[j]), "fields": {}, "token": int(seq.tokens[j]),
                "codes": [int(c) for c in seq.codes[j]], "gap": int(gaps[j]), "window": []})])
        live = [states[u] for u in users]
        ms, got = {}, {}
        order = ("full", "incremental") if (i // batch) % 2 else ("incremental", "full")  # alternate
        with torch.no_grad():
            for name in order:
                t0 = time.perf_counter()
                got[name] = scorer.window_states(live) if name == "full" else scorer.model_windows.states(live, scorer._batch)
                ms[name] = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            fresh = scorer.predicted(live, *got["incremental"], 0.0)
            ms["rest"] = (time.perf_counter() - t0) * 1e3
        for u, st in zip(users, fresh):
            states[u] = st
        worst = max(worst, float((got["full"][0] - got["incremental"][0]).abs().max()))
        if i >= warmup:
            timed += len(part)
            for k, v in ms.items():
                per[k].append(v / len(part))
                total[k] += v
    w = scorer.model_windows
    out = {"events": timed, "rounds": len(per["full"]), "max_abs_h_diff": worst,
           "hit_rate": round((w.hits - hits0) / max(w.hits - hits0 + w.misses - misses0, 1), 3)}
    for k, v in per.items():
        out[f"{k}_ms_per_event"] = round(statistics.median(v), 3)
        out[f"{k}_events_per_s"] = round(timed / (total[k] / 1e3), 1)
    for k in ("full", "incremental"):
        out[f"refresh_{k}_events_per_s"] = round(timed / ((total[k] + total["rest"]) / 1e3), 1)
    out["speedup_states"] = round(total["full"] / total["incremental"], 2)
    out["speedup_refresh"] = round((total["full"] + total["rest"]) / (total["incremental"] + total["rest"]), 2)
    return out


def measure(run: Path, model: str, batches: list[int], n_events: int, warmup: int) -> dict:
    from pantherseq.data.sequences import Sequences
    from pantherseq.serve.embed import event_amounts, user_states
    from pantherseq.serve.scorer import Scorer, parse_time
    from pantherseq.serve.windows import Windows

    scorer = Scorer(run, model)  # no fraud report: the fraud default context (100)
    seq = Sequences.load(scorer.run.sequences)
    cut_s = parse_time(json.loads((run / "prepare.json").read_text())["split"]["t2"])[0]  # the test period
    ids = scorer.run.read_users()["user_id"].cast(pl.Utf8).to_list()
    embedded = {s.user_id: s for b in user_states(scorer, seq, event_amounts(scorer, None, seq.n_events), ids, cut_s)
                for s in b}
    t = np.asarray(seq.time)
    user_of = np.repeat(np.arange(seq.n_users), np.diff(seq.offsets))
    after = np.flatnonzero(t >= cut_s)
    events = after[np.argsort(t[after], kind="stable")][:warmup + n_events]
    out = {"context": scorer.context, "max_len": scorer.max_len, "users": len(set(user_of[events].tolist()))}
    for b in batches:
        scorer.model_windows = Windows(scorer.model64, scorer.context, 512 << 20)  # an empty cache per run
        states = {u: s for u, s in embedded.items()}
        states |= {u: scorer.new_state(u) for u in ids if u not in states}
        out[f"batch_{b}"] = replay(scorer, seq, events, user_of, states, ids, b, warmup)
        print(f"{model} batch {b}: {out[f'batch_{b}']}", flush=True)
    return out


def table(results: dict) -> str:
    rows = [("| model | users per refresh | full ms/event | incremental ms/event | states speed-up | full refresh "
             "events/s | incremental refresh events/s | refresh speed-up | hit rate |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model, res in results["models"].items():
        for key, r in res.items():
            if not key.startswith("batch_"):
                continue
            rows.append(f"| {model} | {key.removeprefix('batch_')} | {r['full_ms_per_event']:.2f} | "
                        f"{r['incremental_ms_per_event']:.2f} | {r['speedup_states']:.1f}× | "
                        f"{r['refresh_full_events_per_s']:.0f} | {r['refresh_incremental_events_per_s']:.0f} | "
                        f"{r['speedup_refresh']:.1f}× | {r['hit_rate']:.2f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(REPO / "runs" / "refresh-step"))
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--models", default="panther,transformer")
    ap.add_argument("--budget-s", type=float, default=20.0)
    ap.add_argument("--events", type=int, default=1500)
    ap.add_argument("--warmup", type=int, default=900)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--out", default=str(RESULTS / "refresh_step.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    models = [m for m in args.models.split(",") if m]
    batches = [int(b) for b in args.batches.split(",")]
    run = prepare_run(Path(args.work), args.users, models, args.budget_s)
    results = {"command": " ".join([".venv/bin/python", "benchmarks/refresh_step.py", *sys.argv[1:]]),
               "threads": 1, "models": {}}
    for m in models:
        results["models"][m] = measure(run, m, batches, args.events, args.warmup)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\n-> {args.out} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
