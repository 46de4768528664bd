"""What each `pantherseq` subcommand does with its parsed arguments: check them, call the stage, print a summary.

cli.py holds the parser and dispatches to the `cmd_*` function a subcommand names; the stages themselves
live in their modules (prepare.py, train/, eval/, fraud/, serve/, llm4es/, report.py, demo.py) and are
imported only when their command runs, so `pantherseq --help` stays fast.
"""

from __future__ import annotations

import argparse

from pantherseq.errors import ConfigError, echo
from pantherseq.run import RunDir

EVAL_SPLITS = ("valid", "test")


def _run(path: str) -> RunDir:
    """The prepared run `--run` names (one ConfigError line when it is not one)."""
    return RunDir(path).require()


def cmd_prepare(args: argparse.Namespace) -> int:
    from pantherseq.data.schema import load_dataset_config
    from pantherseq.prepare import format_prepare_report, prepare

    cfg = load_dataset_config(args.dataset, args.config, args.set, data=args.data, table=args.table)
    report = prepare(cfg, args.out, force=args.force, engine=args.engine, spark_master=args.spark_master,
                     tokenizer_from=args.tokenizer_from)
    print(f"prepared {args.out}\n{format_prepare_report(report)}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from pantherseq.config import save_toml
    from pantherseq.data.dataset import require_train_targets
    from pantherseq.train.loop import load_pretrain_config, train
    from pantherseq.train.warmstart import init_model_name, load_init

    source = load_init(args.init_from) if args.init_from else None
    model = init_model_name(source, args.model) if source else (args.model or "panther")
    cfg = load_pretrain_config(args.config, args.set, model=model, init_from=source)
    run = _run(args.run)
    require_train_targets(None, cfg.model.max_len, run)  # shard by shard
    name = args.name or model
    out = run.model_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    save_toml(cfg, run.pretrain_config(name))
    metrics = train(run, model, cfg, resume=args.resume, name=name)
    v = metrics["valid"]
    init = metrics.get("init_from")
    if init:
        print(f"initialised from {init['path']}: {init['tokens_matched']:,} of {init['tokens_total']:,} tokens "
              f"matched{' (same tokenizer)' if init['same_tokenizer'] else ' by label'}")
    print(f"trained {name} ({model}) on {args.run}: {metrics['epochs']} epochs in {metrics['train_s']:.0f} s, "
          f"{metrics['train_events_per_s']:,.0f} events/s, peak {metrics['peak_mb']:.0f} MB\n"
          f"  valid HR@1 {v['hr@1']:.4f}  HR@10 {v['hr@10']:.4f}  NDCG@10 {v['ndcg@10']:.4f}  "
          f"MRR {v['mrr']:.4f}  (n = {v['n']:,})\n  -> {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pantherseq.eval.nextevent import evaluate_run, format_table

    splits = tuple(s for s in args.split.split(",") if s)
    bad = [s for s in splits if s not in EVAL_SPLITS]
    if bad or not splits:
        raise ConfigError(f"--split {echo(args.split)}: {echo(bad[0]) if bad else 'nothing'} is not a split; "
                          f"choose from {', '.join(EVAL_SPLITS)} (comma-separated)")
    run = _run(args.run)
    models = [m for m in args.models.split(",") if m] if args.models else None
    results = evaluate_run(run, models, splits, max_users=args.max_users, seed=args.seed)
    for split in splits:
        print(f"{split}:\n{format_table(results, split)}")
    print(f"-> {run.eval_report}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pantherseq.predict import format_predictions, predict

    run = _run(args.run)
    frame = predict(run, args.model, args.events, top_k=args.top_k)
    out = Path(args.out) if args.out else run.predictions
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(out)
    known = int(frame["known_user"].sum())
    print(f"predicted the next behaviour of {frame.height:,} users ({frame.height - known:,} new to the run) "
          f"from {args.events} with {args.model}\n{format_predictions(frame, args.show)}\n-> {out}")
    return 0


def cmd_fraud(args: argparse.Namespace) -> int:
    from pantherseq.fraud.pipeline import format_fraud_table, load_fraud_config, run_fraud

    cfg = load_fraud_config(args.config, args.set)
    _run(args.run)
    report = run_fraud(args.run, args.model, cfg)
    print(f"fraud risk models on {args.run} with {args.model}: {report['rows']['test']:,} test transactions, "
          f"{report['rows']['test_frauds']:,} frauds\n{format_fraud_table(report)}\n"
          f"-> {report['out']}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from pantherseq.serve.embed import embed_users
    from pantherseq.serve.scorer import Scorer
    from pantherseq.store import open_store

    run = _run(args.run)
    scorer = Scorer(args.run, args.model, args.fraud_dir, threads=args.threads)
    if args.engine == "spark":
        from pantherseq.spark.embed import embed_spark

        meta = embed_spark(scorer, args.store, args.states_parquet or run.path / "states.parquet", args.until,
                           args.batch_size, migrate=args.migrate, master=args.spark_master,
                           fraud_dir=args.fraud_dir, threads=args.threads)
        print(f"embedded {meta['users']:,} users of {args.run} with {meta['model_version']} as of "
              f"{meta['until'] or 'the last event'} on Spark ({meta['tasks']} tasks) into {args.store} and "
              f"{meta['parquet']} in {meta['seconds']:.1f} s")
        return 0
    with open_store(args.store) as store:
        meta = embed_users(scorer, store, args.until, args.batch_size, migrate=args.migrate)
    print(f"embedded {meta['users']:,} users of {args.run} with {meta['model_version']} as of "
          f"{meta['until'] or 'the last event'} into {args.store} in {meta['seconds']:.1f} s")
    return 0


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def _access_log(target: str | None) -> None:
    """The access log's JSON lines to a file (`-` = stdout), or nowhere; never mixed into stderr's log."""
    import logging
    import sys

    logger = logging.getLogger("pantherseq.access")
    logger.propagate = False
    if target:
        try:
            handler = logging.StreamHandler(sys.stdout) if target == "-" else logging.FileHandler(target)
        except OSError as e:
            raise ConfigError(f"--access-log {target}: {e.strerror}") from None
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    import uvicorn

    from pantherseq.serve.app import create_app
    from pantherseq.serve.auth import ENV, ApiKeys
    from pantherseq.serve.scorer import Scorer
    from pantherseq.serve.service import Service
    from pantherseq.store import open_store

    keys = ApiKeys.load(args.api_keys)
    if keys is None and not _is_loopback(args.host):
        raise ConfigError(f"refusing to serve on {echo(args.host)} without API keys: give --api-keys FILE or "
                          f"${ENV} (docs/SECURITY.md), or serve on 127.0.0.1")
    for name in ("max_body_kb", "max_batch", "score_threads"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    _access_log(args.access_log)
    _run(args.run)
    scorer = Scorer(args.run, args.model, args.fraud_dir, args.feature_set, threads=args.threads)
    store = open_store(args.store)
    external = args.external_refresh or args.workers > 0
    service = Service(scorer, store, refresh=not args.no_refresh, migrate=args.migrate,
                      score_threads=args.score_threads, new_users_per_minute=args.new_users_per_minute,
                      external_refresh=external and not args.no_refresh)
    try:
        service.start()
    except BaseException:
        store.close()
        raise
    # uvicorn shuts down on SIGTERM, then raises it again with the handler it found (>= 0.29): with the
    # default one the process died there, skipping the clean-up below and leaving `--workers` running
    signal.signal(signal.SIGTERM, _terminated)
    workers: list = []
    try:
        workers = _start_workers(args) if args.workers > 0 and not args.no_refresh else []
        print(f"serving {scorer.model_version} ({scorer.feature_set or 'deviation score: no risk model'}) from "
              f"{args.store} on http://{args.host}:{args.port} (docs: /docs; "
              f"{'API keys required' if keys else 'no API keys'})", flush=True)
        app = create_app(service, keys, max_body=args.max_body_kb * 1024, max_batch=args.max_batch,
                         guard_metrics=args.guard_metrics)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    except _Terminated:
        pass  # a requested stop: exit 0 once everything below is closed
    finally:
        service.stop()
        store.close()
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(timeout=30)
    return 0


class _Terminated(Exception):
    """SIGTERM reached `serve` (after uvicorn's graceful shutdown)."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _start_workers(args: argparse.Namespace) -> list:
    """`--workers N`: N `pantherseq refresh` processes on the same run, model and store."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pantherseq.cli", "refresh", "--run", args.run, "--model", args.model,
           "--store", args.store, "--threads", str(args.threads),
           *(["--fraud-dir", args.fraud_dir] if args.fraud_dir else [])]
    return [subprocess.Popen(cmd) for _ in range(args.workers)]


def cmd_refresh(args: argparse.Namespace) -> int:
    import os
    import signal
    import socket
    import threading

    from pantherseq.serve.refresher import run_worker
    from pantherseq.serve.scorer import Scorer
    from pantherseq.serve.service import Service
    from pantherseq.store import open_store

    if args.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if not 0 <= args.linger <= 1:
        raise ConfigError(f"--linger must be within [0, 1] seconds, got {args.linger}")
    if args.nice < 0:
        raise ConfigError("--nice must be at least 0 (a worker may only lower its priority)")
    os.nice(args.nice)  # before loading the model: its start-up should not slow the scorers either
    _run(args.run)
    consumer = args.consumer or f"{socket.gethostname()}-{os.getpid()}"
    scorer = Scorer(args.run, args.model, args.fraud_dir, threads=args.threads)
    store = open_store(args.store)
    service = Service(scorer, store, warm=False, score_threads=1, external_refresh=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        service.start()
        print(f"refresh worker {consumer}: {scorer.model_version} on {args.store}", flush=True)
        n = run_worker(service, consumer, stop, args.batch_size, linger_s=args.linger)
    finally:
        service.stop()
        store.close()
    print(f"refresh worker {consumer}: {n:,} queued events refreshed")
    return 0


def cmd_llm4es(args: argparse.Namespace) -> int:
    from pantherseq.llm4es.pipeline import load_llm4es_config, run_llm4es
    from pantherseq.llm4es.pretrained import resolve_model_dir
    from pantherseq.llm4es.text import load_descriptions

    sets = list(args.set or [])
    for key, value in (("text.format", args.format), ("kind", args.kind), ("finetune.steps", args.steps),
                       ("finetune.budget_s", args.budget_s)):
        if value is not None:
            sets.append(f"{key}={value}")
    if args.budget_s is not None and args.steps is None:
        sets.append("finetune.steps=0")  # the budget alone decides
    if args.no_finetune:
        sets.append("train=false")
    cfg = load_llm4es_config(args.config, sets)
    _run(args.run)
    descriptions = {}
    for item in args.describe or []:
        name, sep, file = item.partition("=")
        if not sep:
            raise ConfigError(f"--describe {item!r} is not of the form FIELD=FILE")
        descriptions[name] = load_descriptions(file)
    report = run_llm4es(args.run, resolve_model_dir(args.model_dir), cfg, args.out, descriptions)
    m, r = report["model"], report["finetune_result"]
    trained = (f"fine-tuned {r['steps']} steps in {r['seconds']:.0f} s (loss {r['loss_first']:.3f} -> "
               f"{r['loss_last']:.3f})" if report["finetuned"] else "not fine-tuned")
    print(f"llm4es on {args.run}: {report['users']:,} users as {report['format']} text, {m['kind']} model "
          f"{m['architecture']} ({m['params'] / 1e6:.1f}M parameters), {trained}\n"
          f"  embeddings {report['users']:,} x {report['embedding_dim']} (mean of the last "
          f"{report['n_layers_used']} layers) in {report['timings']['embed_s']:.1f} s\n  -> {report['out']}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from pantherseq.eval.probe import ProbeConfig, format_probe_table, run_probe

    _run(args.run)
    names = [n for n in args.embeddings.split(",") if n]
    report = run_probe(args.run, names, args.target, folds=args.folds, seed=args.seed, repeats=args.repeats,
                       split=args.split, history=args.history, profile=args.profile,
                       cfg=ProbeConfig(rounds=args.rounds))
    print(f"{format_probe_table(report)}\n-> {RunDir(args.run).probe_report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pantherseq.report import write_report

    html_path, md_path = write_report(args.run_dir)
    print(f"report of {args.run_dir}\n  -> {html_path}\n  -> {md_path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pantherseq.demo import run_demo

    return run_demo(args.out, args.epochs, args.set, report=not args.no_report)
