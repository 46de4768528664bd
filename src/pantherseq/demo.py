"""`pantherseq demo`: the whole system on the built-in simulator, in one command.

    [1/7] prepare       simulate users and events, tokenize, split by time
    [2/7] pretrain      panther, transformer (at most DEMO_EPOCHS epochs each, early stopping), the
                        personal-frequency and Markov baselines
    [3/7] evaluate      next-behaviour prediction on the test period, side by side
    [4/7] fraud         deviation + user-state features from PANTHER, the hybrid risk model vs the baseline
    [5/7] embed         every user's state as of the fraud test period's start, into RUN/states.db (SQLite)
    [6/7] serve         start the scoring service on a free loopback port, replay test transactions
                        through HTTP, stop it (latencies -> RUN/serve_demo.json)
    [7/7] report        RUN/report.html and report.md

It ends with a summary table in the terminal.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pantherseq.run import RunDir

log = logging.getLogger(__name__)

DEMO_MODELS = ("panther", "transformer", "personal", "markov")  # the two counting baselines in every table
DEMO_EPOCHS = 3  # simulator: PANTHER + heads passes personal frequency from epoch 1 (valid HR@10 .43 vs .40)
DEMO_TRAIN = ["model.max_len=64", "train.patience=2", "train.eval_max_users=400"]
STEPS = 7
# context 32 of max_len 64: 32 predictions per forward pass (the default 100 would leave one per window);
# a LightGBM round cap that fits the demo's few minutes
DEMO_FRAUD_SETTINGS = {"context": 32, "lgbm": {"max_rounds": 500, "early_stopping": 50}}


def _step(i: int, text: str) -> None:
    print(f"\n[{i}/{STEPS}] {text}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_demo(run: RunDir | Path, model: str, store_url: str, since: str, n: int = 300) -> dict[str, Any]:
    """Start the service in this process on a free port, replay the first `n` transactions from `since` in
    time order through HTTP, stop it; returns and writes RUN/serve_demo.json."""
    import httpx
    import uvicorn

    from pantherseq.serve.app import create_app
    from pantherseq.serve.scorer import Scorer
    from pantherseq.serve.service import Service
    from pantherseq.store import open_store

    run = RunDir.of(run)
    # one line per request (the access log, httpx) would bury the demo's output: the summary says it all
    for name in ("pantherseq.access", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    scorer = Scorer(run, model)
    store = open_store(store_url)
    service = Service(scorer, store)
    service.start()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    fields = [f.name for f in scorer.cfg.fields if getattr(f, "derive", None) is None]
    ev = (run.read_events()
          .filter(pl.col("timestamp") >= pl.lit(since).str.to_datetime())
          .sort("timestamp", maintain_order=True).head(n))
    latencies, responses = [], []
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        with httpx.Client(base_url=base, timeout=30) as client:
            for row in ev.iter_rows(named=True):
                body = {"user_id": str(row["user_id"]), "timestamp": row["timestamp"].isoformat(),
                        **{f: row[f] for f in fields}}
                t0 = time.perf_counter()
                r = client.post("/score", json=body)
                latencies.append((time.perf_counter() - t0) * 1e3)
                r.raise_for_status()
                out = r.json()
                responses.append({"user_id": body["user_id"], "timestamp": body["timestamp"],
                                  "label": row.get("label"), "score": out["score"],
                                  "cold_start": out["cold_start"], "stale": out["stale"],
                                  "top_expected": out["top_expected"][:3]})
            service.refresher.wait_idle(30)
            stats = client.get("/stats").json()
    finally:
        server.should_exit = True
        thread.join(10)
        service.stop()
        store.close()
    lat = np.asarray(latencies)
    result = {"requests": len(latencies), "latencies_ms": [round(x, 3) for x in latencies],
              "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
              "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
              "refresh_lag_s": stats["refresh_lag_s"], "model_version": scorer.model_version,
              "feature_set": scorer.feature_set, "responses": responses[:20]}
    run.serve_demo.write_text(json.dumps(result, indent=1))
    return result


def run_demo(out: str | Path, epochs: int = DEMO_EPOCHS, sets: list[str] | None = None, report: bool = True) -> int:
    from pantherseq.config import build_config
    from pantherseq.data.schema import load_dataset_config
    from pantherseq.eval.nextevent import evaluate_run, format_table
    from pantherseq.fraud.pipeline import FraudConfig, format_fraud_table, run_fraud
    from pantherseq.prepare import format_prepare_report, prepare
    from pantherseq.serve.embed import embed_users
    from pantherseq.serve.scorer import Scorer
    from pantherseq.store import open_store
    from pantherseq.train.loop import load_pretrain_config, train

    started = time.perf_counter()
    run = RunDir(out)
    _step(1, "prepare: simulating users and events")
    rep = prepare(load_dataset_config("simulated", None, sets), run.path, force=True)  # the demo re-runs itself
    print(format_prepare_report(rep), flush=True)

    _step(2, f"pretrain: {', '.join(DEMO_MODELS)} (at most {epochs} epochs per neural model)")
    for name in DEMO_MODELS:  # PANTHER's SPRM prototype analysis (RUN/prototypes.json) comes with its training
        train(run, name, load_pretrain_config(None, [*DEMO_TRAIN, f"train.epochs={epochs}"], model=name))

    _step(3, "evaluate: next-behaviour prediction on the test period")
    results = evaluate_run(run, list(DEMO_MODELS), ("test",))
    print(f"full ranking over {rep['vocab_size']} tokens:\n{format_table(results, 'test')}", flush=True)

    _step(4, "fraud: baseline vs PANTHER deviation / user-state features (LightGBM)")
    fraud_cfg = build_config(FraudConfig, DEMO_FRAUD_SETTINGS, "demo fraud config")
    fraud = run_fraud(run, "panther", fraud_cfg)
    print(format_fraud_table(fraud), flush=True)

    test_start = fraud["periods"]["test"][0][:19]
    _step(5, f"embed: every user's state as of {test_start} into {run.states}")
    store_url = f"sqlite:///{run.states}"
    run.states.unlink(missing_ok=True)
    scorer = Scorer(run, "panther")
    with open_store(store_url) as store:
        meta = embed_users(scorer, store, test_start)
    print(f"{meta['users']:,} users in {meta['seconds']:.1f} s", flush=True)

    _step(6, "serve: scoring live test transactions through HTTP")
    served = serve_demo(run, "panther", store_url, test_start)
    print(f"{served['requests']} transactions scored over HTTP: p50 {served['p50_ms']:.1f} ms, "
          f"p99 {served['p99_ms']:.1f} ms (client side, with the background refresh on)", flush=True)

    report_path = None
    if report:
        _step(7, "report")
        from pantherseq.report import write_report

        report_path, _ = write_report(run)
    summary(run.path, results, fraud, served, report_path, time.perf_counter() - started)
    return 0


def summary(run: Path, results: dict, fraud: dict, served: dict, report_path: Path | None, wall: float) -> None:
    lines = ["", "=" * 72, f"pantherseq demo: done in {wall / 60:.1f} min — {run}", "-" * 72]
    for name, r in results.items():
        t = r.get("test", {})
        lines.append(f"  next behaviour   {name:<12} HR@10 {t.get('hr@10', float('nan')):.4f}  "
                     f"NDCG@10 {t.get('ndcg@10', float('nan')):.4f}")
    for name, r in fraud["feature_sets"].items():
        lines.append(f"  fraud            {name:<20} AP {r['average_precision']:.4f}  recall@1% {r['recall@1%']:.4f}")
    lines.append(f"  serving          {served['requests']} requests, p50 {served['p50_ms']:.1f} ms, "
                 f"p99 {served['p99_ms']:.1f} ms")
    if report_path:
        lines.append(f"  report           {report_path}")
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)
