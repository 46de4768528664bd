"""Where the serving request path's time goes (issue 14): `Service.score` in-process on the handbook run of
`benchmarks/fraud.py`, refresh off, one thread — first timed, then under cProfile.

    .venv/bin/python benchmarks/serve_profile.py [--run runs/fraud-handbook/handbook] [--model panther]
        [--fraud-dir RUN/fraud-MODEL] [--until 2018-08-08] [--n 500] [--out benchmarks/results/serve_profile.json]

Embeds every user's state as of `--until` into a temporary SQLite store (each with its compact prediction,
fraud/deviation.py), starts a `Service`, scores 100 test-period transactions to warm up, then `--n` more
timed and the next `--n` under cProfile. Reports ms per score, the scores that had to make a prediction
from h (one V × D product: a state without a stored one) and the cumulative ms per score of the request
path's main steps (the functions in STEPS).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = {  # label: (file suffix, function name) in the profile
    "score (whole request path)": ("serve/service.py", "score"),
    "features": ("serve/scorer.py", "features"),
    "prediction (the state's compact one; V x D only without)": ("serve/scorer.py", "prediction"),
    "  V x D product (torch.addmm)": ("~", "<built-in method torch.addmm>"),
    "deviation features (dot products of h, top-1,024 ranks)": ("fraud/behaviour.py", "deviation"),
    "short-window means": ("fraud/behaviour.py", "windows"),
    "risk model (LightGBM predict)": ("serve/scorer.py", "score"),
    "durable append": ("store/sqlite.py", "append_event"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(REPO / "runs" / "fraud-handbook" / "handbook"))
    ap.add_argument("--model", default="panther")
    ap.add_argument("--fraud-dir")
    ap.add_argument("--until", default="2018-08-08")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_profile.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from pantherseq.serve.embed import embed_users
    from pantherseq.serve.scorer import Scorer
    from pantherseq.serve.service import Service
    from pantherseq.store import open_store
    from serve import transactions

    run = Path(args.run)
    fraud_dir = Path(args.fraud_dir or run / f"fraud-{args.model}")
    with tempfile.TemporaryDirectory(prefix="pantherseq-profile-") as tmp:
        tx_file = Path(tmp) / "tx.jsonl"
        transactions(run, args.until, tx_file)
        txs = [json.loads(s) for s in tx_file.read_text().splitlines()[:100 + 2 * args.n]]
        scorer = Scorer(run, args.model, fraud_dir)
        url = f"sqlite:///{Path(tmp) / 'states.db'}"
        with open_store(url) as store:
            embed_users(scorer, store, args.until, progress=False)
        svc = Service(scorer, open_store(url), refresh=False)
        svc.start()
        for t in txs[:100]:
            svc.score(t)
        t0 = time.perf_counter()
        for t in txs[100:100 + args.n]:
            svc.score(t)
        timed_ms = (time.perf_counter() - t0) / args.n * 1e3
        prof = cProfile.Profile()
        prof.enable()
        for t in txs[100 + args.n:]:
            svc.score(t)
        prof.disable()
        svc.stop()
        svc.store.close()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    steps = {}
    for label, (suffix, name) in STEPS.items():
        hits = [(k, v) for k, v in stats.items() if k[2] == name and k[0].endswith(suffix)]
        steps[label] = round(sum(v[3] for _, v in hits) / args.n * 1e3, 3) if hits else None
    predict = [v for k, v in stats.items() if k[2] == "predict" and k[0].endswith("fraud/deviation.py")]
    misses = int(sum(v[1] for v in predict)) if predict else 0
    out = {"n": args.n, "ms_per_score": round(timed_ms, 3), "predictions_made_profiled": misses,
           "cache_mb": scorer.cache.max_bytes >> 20, "users": len(scorer.user_index),
           "profiled_ms_per_score": steps, "command": " ".join([".venv/bin/python", "benchmarks/serve_profile.py",
                                                                *sys.argv[1:]])}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"{args.n} scores in-process, refresh off: {timed_ms:.2f} ms each; profiled pass: {misses} of {args.n} "
          f"made a prediction from h (V x D; {out['users']} users, fallback cache {out['cache_mb']} MB)")
    print(f"{'step (cumulative, under cProfile)':<55}{'ms/score':>10}")
    for label, ms in steps.items():
        print(f"{label:<55}{ms if ms is not None else '-':>10}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
