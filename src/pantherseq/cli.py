"""The `pantherseq` command: one entry point, subcommands are verbs.

    pantherseq prepare --dataset NAME [--data PATH] [--config FILE] [--set key=value ...] --out RUN_DIR
    pantherseq pretrain --run RUN_DIR --model NAME [--config FILE] [--set key=value ...] [--resume]
    pantherseq evaluate --run RUN_DIR [--models a,b] [--split test]
    pantherseq fraud --run RUN_DIR --model NAME [--config FILE] [--set key=value ...]
    pantherseq embed --run RUN_DIR --model NAME --store URL [--until TIME]
    pantherseq serve --run RUN_DIR --model NAME --store URL [--host 127.0.0.1 --port 8000]
    pantherseq llm4es --run RUN_DIR --model-dir DIR [--format plain|json|markdown] [--steps N | --budget-s S]
    pantherseq probe --run RUN_DIR --embeddings aggregates,panther,aggregates+panther --target gender
    pantherseq report RUN_DIR
    pantherseq demo [--out RUN_DIR] [--budget SECONDS]

Every user error (bad input, bad config) ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pantherseq.data.schema import DATASETS
from pantherseq.errors import PantherseqError

log = logging.getLogger("pantherseq")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "-"
    return str(value)


def format_prepare_report(report: dict[str, Any]) -> str:
    """The terminal summary of prepare.json."""
    split = report["split"]
    rows = [
        ("dataset", f"{report['dataset']} ({report['source']})"),
        ("rows read / kept", f"{report['rows_read']:,} / {report['rows_kept']:,}"),
        ("rows dropped", _fmt(report["rows_dropped"])),
        ("users", f"{report['users']:,}"),
        ("token fields", " x ".join(report["token_fields"])),
        ("raw combinations", f"{report['raw_combinations']:,}"),
        ("vocabulary", f"{report['vocab_size']:,} (top_k {report['top_k']:,})"),
        ("coverage", f"{report['coverage']:.2%} of kept events (96% needs K = {report['k_for_96pct']:,})"),
        ("users with any UNK", f"{report['unk_users']:.2%}"),
        ("split", f"{split['kind']}: events {_fmt(split['events'])}"),
        ("labels", _fmt(report.get("labels") or {})),
        ("wall time", f"{report['wall_s']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def cmd_prepare(args: argparse.Namespace) -> int:
    from pantherseq.data.schema import load_dataset_config
    from pantherseq.prepare import prepare

    cfg = load_dataset_config(args.dataset, args.config, args.set, data=args.data)
    report = prepare(cfg, args.out)
    print(f"prepared {args.out}\n{format_prepare_report(report)}")
    return 0


def load_pretrain_config(file: str | None, overrides: list[str] | None):
    from pantherseq.config import apply_overrides, build_config, load_toml
    from pantherseq.train.loop import PretrainConfig

    raw = load_toml(file) if file else {}
    return build_config(PretrainConfig, apply_overrides(raw, overrides), str(file) if file else "config")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from pantherseq.config import save_toml
    from pantherseq.train.checkpoint import model_dir
    from pantherseq.train.loop import train

    cfg = load_pretrain_config(args.config, args.set)
    _check_run(args.run)
    name = args.name or args.model
    out = model_dir(args.run, name)
    out.mkdir(parents=True, exist_ok=True)
    save_toml(cfg, out / "pretrain.toml")
    metrics = train(args.run, args.model, cfg, resume=args.resume, name=name)
    v = metrics["valid"]
    print(f"trained {name} ({args.model}) on {args.run}: {metrics['epochs']} epochs in {metrics['train_s']:.0f} s, "
          f"{metrics['train_events_per_s']:,.0f} events/s, peak {metrics['peak_mb']:.0f} MB\n"
          f"  valid HR@1 {v['hr@1']:.4f}  HR@10 {v['hr@10']:.4f}  NDCG@10 {v['ndcg@10']:.4f}  "
          f"MRR {v['mrr']:.4f}  (n = {v['n']:,})\n  -> {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pantherseq.eval.nextevent import evaluate_run, format_table

    _check_run(args.run)
    models = [m for m in args.models.split(",") if m] if args.models else None
    splits = tuple(s for s in args.split.split(",") if s)
    results = evaluate_run(args.run, models, splits, max_users=args.max_users, seed=args.seed)
    for split in splits:
        print(f"{split}:\n{format_table(results, split)}")
    print(f"-> {Path(args.run) / 'eval.json'}")
    return 0


def cmd_fraud(args: argparse.Namespace) -> int:
    from pantherseq.fraud.pipeline import format_fraud_table, load_fraud_config, run_fraud

    cfg = load_fraud_config(args.config, args.set)
    _check_run(args.run)
    report = run_fraud(args.run, args.model, cfg)
    print(f"fraud risk models on {args.run} with {args.model}: {report['rows']['test']:,} test transactions, "
          f"{report['rows']['test_frauds']:,} frauds\n{format_fraud_table(report)}\n"
          f"-> {report['out']}")
    return 0


def _check_run(run: str) -> None:
    from pantherseq.errors import ConfigError

    if not (Path(run) / "prepare.json").is_file():
        raise ConfigError(f"{run} is not a prepared run directory (no prepare.json): run `pantherseq prepare`")


def cmd_embed(args: argparse.Namespace) -> int:
    from pantherseq.serve.embed import embed_users
    from pantherseq.serve.online import OnlineModel
    from pantherseq.store import open_store

    _check_run(args.run)
    om = OnlineModel(args.run, args.model, args.fraud_dir, threads=args.threads)
    with open_store(args.store) as store:
        meta = embed_users(om, store, args.until, args.batch_size)
    print(f"embedded {meta['users']:,} users of {args.run} with {meta['model_version']} as of "
          f"{meta['until'] or 'the last event'} into {args.store} in {meta['seconds']:.1f} s")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pantherseq.serve.app import Service, create_app
    from pantherseq.serve.online import OnlineModel
    from pantherseq.store import open_store

    _check_run(args.run)
    om = OnlineModel(args.run, args.model, args.fraud_dir, args.feature_set, threads=args.threads)
    store = open_store(args.store)
    service = Service(om, store, refresh=not args.no_refresh)
    service.start()
    print(f"serving {om.model_version} ({om.feature_set or 'deviation score: no risk model'}) from {args.store} "
          f"on http://{args.host}:{args.port} (docs: /docs)", flush=True)
    try:
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning", access_log=False)
    finally:
        service.stop()
        store.close()
    return 0


def cmd_llm4es(args: argparse.Namespace) -> int:
    from pantherseq.errors import ConfigError
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
    _check_run(args.run)
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

    _check_run(args.run)
    names = [n for n in args.embeddings.split(",") if n]
    report = run_probe(args.run, names, args.target, folds=args.folds, seed=args.seed, repeats=args.repeats,
                       split=args.split, history=args.history, profile=args.profile,
                       cfg=ProbeConfig(rounds=args.rounds))
    print(f"{format_probe_table(report)}\n-> {Path(args.run) / 'probe.json'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pantherseq.report import write_report

    html_path, md_path = write_report(args.run_dir)
    print(f"report of {args.run_dir}\n  -> {html_path}\n  -> {md_path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pantherseq.demo import run_demo

    return run_demo(args.out, args.budget, args.set, report=not args.no_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pantherseq",
        description="Generative pretraining on sequences of user behaviour (PANTHER): prepare data, "
                    "pretrain, evaluate, score fraud, serve.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="read raw events, fit the tokenizer, write token sequences",
                       description="Read a dataset, validate it, split it, fit the structured tokenizer on "
                                   "the training period and write the run directory (prepare.json, "
                                   "tokenizer.json, sequences/, events.parquet, profile.parquet, config.toml).")
    p.add_argument("--dataset", choices=DATASETS, default="simulated",
                   help="which source adapter and built-in config to use (default: simulated)")
    p.add_argument("--data", help="input: a file, a glob or a folder (handbook, tabformer, csv; "
                                  "movielens100k defaults to the copy in the recbole package)")
    p.add_argument("--config", help="a TOML file merged over the built-in config (required for csv)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one config key, e.g. --set tokenizer.top_k=20000 (repeatable)")
    p.add_argument("--out", required=True, help="the run directory to write")
    p.set_defaults(func=cmd_prepare)

    t = sub.add_parser("pretrain", help="train one next-behaviour model on a prepared run",
                       description="Train a registry model on RUN_DIR's training period, validate each epoch "
                                   "(early stopping on NDCG@10) and write RUN_DIR/models/NAME/ (checkpoint.pt, "
                                   "last.pt, train_log.jsonl, metrics.json, pretrain.toml). Works under "
                                   "torchrun for data-parallel training.")
    t.add_argument("--run", required=True, help="a run directory written by `pantherseq prepare`")
    t.add_argument("--model", default="panther",
                   help="a registry model: panther (default), transformer, sasrec, hstu, markov, popular")
    t.add_argument("--config", help="a TOML file with [model] and [train] tables")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one key, e.g. --set model.d_model=128 --set train.epochs=5 (repeatable)")
    t.add_argument("--name", help="output name under RUN_DIR/models/ (default: the model name)")
    t.add_argument("--resume", action="store_true", help="continue from models/NAME/last.pt")
    t.set_defaults(func=cmd_pretrain)

    e = sub.add_parser("evaluate", help="evaluate trained models side by side",
                       description="Rank every target event of a split over the whole vocabulary with each "
                                   "trained model; write RUN_DIR/eval.json and print the table.")
    e.add_argument("--run", required=True, help="a prepared run directory with trained models")
    e.add_argument("--models", help="comma-separated model names (default: every trained model)")
    e.add_argument("--split", default="test", help="comma-separated splits: valid, test (default: test)")
    e.add_argument("--max-users", type=int, help="evaluate a seeded subset of this many users (default: all)")
    e.add_argument("--seed", type=int, default=0, help="seed of that subset (default: 0)")
    e.set_defaults(func=cmd_evaluate)

    f = sub.add_parser("fraud", help="train and measure the hybrid fraud risk model",
                       description="Build baseline, deviation and user-state features from a trained generative "
                                   "model for the labelled transactions of two time periods, train LightGBM risk "
                                   "models on the first, score the second and write RUN_DIR/fraud/ (fraud.json, "
                                   "risk models, scores.parquet, merchant_risk.parquet, importances.parquet).")
    f.add_argument("--run", required=True, help="a prepared run directory with labels and a trained model")
    f.add_argument("--model", default="panther", help="the trained model's name under RUN_DIR/models/")
    f.add_argument("--config", help="a TOML file with the fraud settings (periods, features, [lgbm])")
    f.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one key, e.g. --set test_start=2018-08-08 --set lgbm.max_rounds=500")
    f.set_defaults(func=cmd_fraud)

    em = sub.add_parser("embed", help="write every user's serving state to a store",
                        description="Compute, for every user, the state the scoring service needs (the last "
                                    "max_len events, recent spending, e_u and the predicted next-behaviour "
                                    "distribution) in batches and write it to the store.")
    sv = sub.add_parser("serve", help="run the real-time scoring service (FastAPI)",
                        description="Serve POST /score, /score/batch, /feedback, GET /users/{id}/state, /health, "
                                    "/metrics, /stats from the states in the store; accepted events are logged "
                                    "durably and users' predictions refreshed in the background.")
    for q in (em, sv):
        q.add_argument("--run", required=True, help="the prepared run directory")
        q.add_argument("--model", default="panther", help="the trained model's name under RUN_DIR/models/")
        q.add_argument("--store", default=None, help="sqlite:///path.db (default: RUN_DIR/states.db) or "
                                                     "redis://host:port/db")
        q.add_argument("--fraud-dir", help="where `pantherseq fraud` wrote the risk model (default RUN_DIR/fraud)")
        q.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    em.add_argument("--until", help="states as of this time (ISO), e.g. the test period's start (default: all)")
    em.add_argument("--batch-size", type=int, default=256, help="users per forward pass (default: 256)")
    em.set_defaults(func=cmd_embed)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--feature-set", default="hybrid", help="which risk model to serve (default: hybrid)")
    sv.add_argument("--no-refresh", action="store_true", help="do not refresh predictions after events")
    sv.set_defaults(func=cmd_serve)

    lm = sub.add_parser("llm4es", help="user embeddings from a language model fine-tuned on event texts",
                        description="LLM4ES: write each user's events as text, fine-tune a local Hugging Face "
                                    "causal LM on it with next-token loss (or embed with an encoder as is) and "
                                    "write OUT/embeddings.npy (row i = user_idx i), users.parquet, config.json "
                                    "and the fine-tuned model under OUT/model/.")
    lm.add_argument("--run", required=True, help="a run directory written by `pantherseq prepare`")
    lm.add_argument("--model-dir", required=True,
                    help="a local Hugging Face model directory, or a packaged model: all-minilm-l6-v2, "
                         "smollm2-135m (nothing is downloaded)")
    lm.add_argument("--format", choices=("plain", "json", "markdown"), help="event text format (default: plain)")
    lm.add_argument("--kind", choices=("auto", "causal", "encoder"), help="model kind (default: from config.json)")
    lm.add_argument("--steps", type=int, help="fine-tuning optimizer steps (default: 100)")
    lm.add_argument("--budget-s", type=float, help="fine-tuning time budget in seconds")
    lm.add_argument("--no-finetune", action="store_true", help="embed with the model as it is")
    lm.add_argument("--describe", action="append", metavar="FIELD=FILE",
                    help="a CSV of code,description for a categorical field, e.g. mcc=mcc_codes.csv (repeatable)")
    lm.add_argument("--config", help="a TOML file with [text] and [finetune] tables")
    lm.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override one key, e.g. --set text.max_events=50 --set finetune.lr=1e-4 (repeatable)")
    lm.add_argument("--out", help="output directory (default: RUN_DIR/llm4es)")
    lm.set_defaults(func=cmd_llm4es)

    pr = sub.add_parser("probe", help="user-level evaluation of frozen user representations",
                        description="Score user representations on a user-level target with LightGBM and "
                                    "stratified k-fold cross-validation, the same folds for every representation "
                                    "(SPEC §10); print mean ± std and merge the report into RUN_DIR/probe.json. "
                                    "A model trained with the target as a profile input (PANTHER with gender or "
                                    "age in its profile) is refused: train one with "
                                    "--set 'model.profile_mode=\"none\"'.")
    pr.add_argument("--run", required=True, help="a prepared run directory")
    pr.add_argument("--embeddings", required=True, metavar="A,B,...",
                    help="comma-separated representations: aggregates, random, a trained model's name, a name "
                         "with RUN_DIR/NAME/embeddings.npy (llm4es, coles), a .npy file (row i = user_idx i); "
                         "a+b concatenates")
    pr.add_argument("--target", required=True, help="gender, age, persona or fraud_victim")
    pr.add_argument("--folds", type=int, default=5, help="cross-validation folds (default: 5)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the folds and the boosters (default: 0)")
    pr.add_argument("--repeats", type=int, default=1, help="reshuffled repeats of the CV, seeds seed.. (default: 1)")
    pr.add_argument("--rounds", type=int, default=500, help="LightGBM boosting rounds (default: 500)")
    pr.add_argument("--split", default="all", help="history up to the end of: all (default), train, valid, test")
    pr.add_argument("--history", default="full", choices=("full", "last"),
                    help="model embeddings: mean over windows of the whole history (default) or the last window")
    pr.add_argument("--profile", default="mean", choices=("mean", "keep"),
                    help="PANTHER's profile input at embedding time: the population mean for everyone "
                         "(default) or each user's own")
    pr.set_defaults(func=cmd_probe)

    rp = sub.add_parser("report", help="write the run's HTML and markdown report with plots",
                        description="Plot and tabulate whatever stages RUN_DIR holds (pretraining curves, "
                                    "next-behaviour metrics, SPRM prototype attention, fraud recall, tokenizer "
                                    "coverage, merchant risk, serving latency) into RUN_DIR/report.html (one "
                                    "self-contained file) and RUN_DIR/report.md (+ RUN_DIR/report/*.png).")
    rp.add_argument("run_dir", metavar="RUN_DIR", help="a run directory")
    rp.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="run the whole system on the built-in simulator",
                       description="Run the whole system on the built-in simulator: prepare, pretrain PANTHER, the "
                                   "transformer and a Markov baseline under a time budget, evaluate them side by "
                                   "side, train the fraud risk models, embed every user into SQLite, serve and "
                                   "score live transactions over HTTP, and write RUN_DIR/report.html.")
    d.add_argument("--budget", type=int, default=90, help="training seconds per neural model (default: 90)")
    d.add_argument("--out", default="runs/demo", help="the run directory (default: runs/demo)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a simulator config key, e.g. --set simulate.n_users=500")
    d.add_argument("--no-report", action="store_true", help="skip the HTML report")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    # OpenMP busy-waiting collapses 2-thread torch under load (docs/BENCHMARKS.md); set before torch loads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    if getattr(args, "store", "unset") is None:
        args.store = f"sqlite:///{Path(args.run) / 'states.db'}"
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except PantherseqError as exc:
        print(f"pantherseq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


TCMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc.so.4",
                  "/usr/lib64/libtcmalloc.so.4", "/usr/lib/libtcmalloc.so.4")
HEAVY = {"pretrain", "evaluate", "demo", "fraud"}


def _preload_tcmalloc(argv: list[str]) -> None:
    """Re-exec once with tcmalloc preloaded for training/evaluation: PyTorch's many small CPU allocations
    run faster with it than with glibc malloc (2.1x in ../shared/docs/MEASURED.md). PANTHERSEQ_MALLOC=system
    turns it off; it is skipped silently when the library is not installed."""
    if os.environ.get("PANTHERSEQ_MALLOC", "tcmalloc") != "tcmalloc" or not HEAVY & set(argv):
        return
    if "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = next((p for p in TCMALLOC_PATHS if os.path.exists(p)), None)
    if lib:
        os.environ["LD_PRELOAD"] = ":".join(filter(None, [lib, os.environ.get("LD_PRELOAD")]))
        os.execv(sys.executable, [sys.executable, "-m", "pantherseq.cli", *argv])


def run() -> None:
    """The console-script entry point (tests call `main` directly, which never re-execs)."""
    argv = sys.argv[1:]
    _preload_tcmalloc(argv)
    sys.exit(main(argv))


if __name__ == "__main__":
    run()
