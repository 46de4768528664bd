"""The `pantherseq` command: one entry point, subcommands are verbs.

    pantherseq prepare --dataset NAME [--data PATH] [--config FILE] [--set key=value ...] --out RUN_DIR
                       [--engine polars|spark] [--spark-master URL] [--tokenizer-from RUN_DIR]
    pantherseq pretrain --run RUN_DIR --model NAME [--config FILE] [--set key=value ...] [--resume]
                        [--init-from RUN_DIR/models/NAME]
    pantherseq evaluate --run RUN_DIR [--models a,b] [--split test]
    pantherseq predict --run RUN_DIR --model NAME --events FILE [--top-k K] [--out PATH]
    pantherseq fraud --run RUN_DIR --model NAME [--config FILE] [--set key=value ...]
    pantherseq embed --run RUN_DIR --model NAME --store URL [--until TIME] [--engine local|spark]
    pantherseq serve --run RUN_DIR --model NAME --store URL [--host 127.0.0.1 --port 8000] [--api-keys FILE]
                     [--workers N | --external-refresh]
    pantherseq refresh --run RUN_DIR --model NAME --store URL [--consumer NAME]
    pantherseq llm4es --run RUN_DIR --model-dir DIR [--format plain|json|markdown] [--steps N | --budget-s S]
    pantherseq probe --run RUN_DIR --embeddings aggregates,panther,aggregates+panther --target gender
    pantherseq report RUN_DIR
    pantherseq demo [--out RUN_DIR] [--epochs N]

Every user error (bad input, bad config) ends with one line on stderr and exit code 2, never a traceback.
This module is the parser and the dispatch; what each subcommand does is `commands.py`'s.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pantherseq.commands import (
    cmd_demo,
    cmd_embed,
    cmd_evaluate,
    cmd_fraud,
    cmd_llm4es,
    cmd_predict,
    cmd_prepare,
    cmd_pretrain,
    cmd_probe,
    cmd_refresh,
    cmd_report,
    cmd_serve,
)
from pantherseq.data.schema import DATASETS
from pantherseq.demo import DEMO_EPOCHS
from pantherseq.errors import PantherseqError
from pantherseq.run import RunDir

log = logging.getLogger("pantherseq")


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
    p.add_argument("--table", help="input instead of --data, with --engine spark: a table of the Spark catalog "
                                   "(e.g. db.events; Hive or another catalog set up by [spark] conf)")
    p.add_argument("--config", help="a TOML file merged over the built-in config (required for csv)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one config key, e.g. --set tokenizer.top_k=20000 (repeatable)")
    p.add_argument("--out", required=True, help="the run directory to write")
    p.add_argument("--force", action="store_true",
                   help="prepare into a run directory that holds trained models (they will not fit it any more)")
    p.add_argument("--tokenizer-from", metavar="RUN_DIR",
                   help="re-use this prepared run's fitted tokenizer (bucket edges, vocabulary) instead of fitting "
                        "one: its models then load into the new run as they are (same fields needed; docs/DATA.md)")
    p.add_argument("--engine", choices=("polars", "spark"), default="polars",
                   help="polars: one process (default); spark: PySpark, csv/handbook sources (docs/SPARK.md)")
    p.add_argument("--spark-master", help="with --engine spark: the master URL (default: [spark] master in the "
                                          "config, local[*])")
    p.set_defaults(func=cmd_prepare)

    t = sub.add_parser("pretrain", help="train one next-behaviour model on a prepared run",
                       description="Train a registry model on RUN_DIR's training period, validate each epoch "
                                   "(early stopping on NDCG@10) and write RUN_DIR/models/NAME/ (checkpoint.pt, "
                                   "last.pt, train_log.jsonl, metrics.json, pretrain.toml). Works under "
                                   "torchrun for data-parallel training.")
    t.add_argument("--run", required=True, help="a run directory written by `pantherseq prepare`")
    t.add_argument("--model", default=None,
                   help="a registry model: panther (default), transformer, sasrec, hstu, markov, popular, personal "
                        "(with --init-from: the checkpoint's)")
    t.add_argument("--config", help="a TOML file with [model] and [train] tables")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one key, e.g. --set model.d_model=128 --set train.epochs=5 (repeatable)")
    t.add_argument("--name", help="output name under RUN_DIR/models/ (default: the model name)")
    t.add_argument("--resume", action="store_true", help="continue from models/NAME/last.pt")
    t.add_argument("--init-from", metavar="RUN_DIR/models/NAME",
                   help="fine-tune from this trained model: its architecture; its weights loaded as they are "
                        "(same tokenizer) or matched by readable token labels (another run's vocabulary; the "
                        "rest fresh). docs/MODELS.md")
    t.set_defaults(func=cmd_pretrain)
    _defaults_in_help(t)

    e = sub.add_parser("evaluate", help="evaluate trained models side by side",
                       description="Rank every target event of a split over the whole vocabulary with each "
                                   "trained model; write RUN_DIR/eval.json and print the table.")
    e.add_argument("--run", required=True, help="a prepared run directory with trained models")
    e.add_argument("--models", help="comma-separated model names (default: every trained model)")
    e.add_argument("--split", default="test", help="comma-separated splits: valid, test (default: test)")
    e.add_argument("--max-users", type=int, help="evaluate a seeded subset of this many users (default: all)")
    e.add_argument("--seed", type=int, default=0, help="seed of that subset (default: 0)")
    e.set_defaults(func=cmd_evaluate)

    pd = sub.add_parser("predict", help="next behaviour and user embedding for the event histories in a file",
                        description="For every user of a CSV/Parquet file of events (new users included; no "
                                    "split), read and checked as `prepare` reads the run's source and encoded "
                                    "with the run's tokenizer (unknown values -> UNK): the top-K next "
                                    "behaviours with readable labels and probabilities, each field's most "
                                    "likely next value (models with field heads) and the user embedding (h, "
                                    "pooled; neural models), as the service computes them. Writes Parquet "
                                    "(default RUN_DIR/predictions.parquet) and prints a few users.")
    pd.add_argument("--run", required=True, help="the prepared run directory the model was trained on")
    pd.add_argument("--model", default="panther", help="the trained model's name under RUN_DIR/models/")
    pd.add_argument("--events", required=True, help="the events: a CSV/Parquet file (or a glob or folder) with "
                                                    "the columns the run's config names")
    pd.add_argument("--top-k", type=int, default=10, help="next behaviours per user (default: 10)")
    pd.add_argument("--out", help="the Parquet file to write (default: RUN_DIR/predictions.parquet)")
    pd.add_argument("--show", type=int, default=5, help="users to print (default: 5)")
    pd.set_defaults(func=cmd_predict)

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
    em.add_argument("--engine", choices=("local", "spark"), default="local",
                    help="local: one process (default); spark: the executors compute the states, also written "
                         "to --states-parquet (docs/SPARK.md)")
    em.add_argument("--spark-master", help="with --engine spark: the master URL (default: [spark] master in the "
                                           "run's config, local[*])")
    em.add_argument("--states-parquet", help="with --engine spark: the Parquet folder of the states "
                                             "(default: RUN_DIR/states.parquet)")
    for q in (em, sv):
        q.add_argument("--migrate", action="store_true",
                       help="take a store written with another model version of this run: serve recomputes its "
                            "states with this model, embed overwrites them (another run's store is always refused)")
    em.set_defaults(func=cmd_embed)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--feature-set", default="hybrid", help="which risk model to serve (default: hybrid)")
    sv.add_argument("--no-refresh", action="store_true", help="do not refresh predictions after events")
    sv.add_argument("--api-keys", metavar="FILE",
                    help="API keys with scopes (TOML or JSON, token hashes; docs/SECURITY.md); default: "
                         "$PANTHERSEQ_API_KEYS, else none (then only a loopback --host is allowed)")
    sv.add_argument("--access-log", metavar="FILE", help="JSON lines per request to FILE (- = stdout)")
    sv.add_argument("--max-body-kb", type=int, default=64, help="request body cap in KiB (default: 64; 413)")
    sv.add_argument("--max-batch", type=int, default=256, help="transactions per /score/batch (default: 256)")
    sv.add_argument("--score-threads", type=int, default=1,
                    help="scoring thread pool size (default: 1; scoring holds the GIL, and more threads on a "
                         "2-core machine collapsed throughput, docs/SERVING.md)")
    sv.add_argument("--new-users-per-minute", type=int, default=6000,
                    help="cap on cold-start users per minute, 0 = none (default: 6000; 429)")
    sv.add_argument("--guard-metrics", action="store_true", help="GET /metrics needs an admin key")
    sv.add_argument("--external-refresh", action="store_true",
                    help="queue refreshes in the store for `pantherseq refresh` workers instead of refreshing "
                         "in this process (every scorer process of a group on one store)")
    sv.add_argument("--workers", type=int, default=0,
                    help="start N `pantherseq refresh` worker processes on the store (implies --external-refresh)")
    sv.set_defaults(func=cmd_serve)

    rf = sub.add_parser("refresh", help="a refresh worker process for scorers on a shared store",
                        description="Take users from the store's refresh queue (Redis: consumer group "
                                    "`refresh`; SQLite: polled), fold their logged events into their states and "
                                    "recompute their predictions, for `serve --external-refresh` scorers.")
    rf.add_argument("--run", required=True, help="the prepared run directory")
    rf.add_argument("--model", default="panther", help="the trained model's name under RUN_DIR/models/")
    rf.add_argument("--store", default=None, help="sqlite:///path.db (default: RUN_DIR/states.db) or "
                                                  "redis://host:port/db")
    rf.add_argument("--fraud-dir", help="where `pantherseq fraud` wrote the risk model (default RUN_DIR/fraud)")
    rf.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    rf.add_argument("--batch-size", type=int, default=64, help="users per forward pass (default: 64)")
    rf.add_argument("--consumer", help="this worker's name in the consumer group (default: host-pid)")
    rf.add_argument("--nice", type=int, default=10,
                    help="lower this worker's CPU priority by N (os.nice) so that scoring requests win a core "
                         "they share with it; refreshing is background work (default: 10; 0 keeps it)")
    rf.add_argument("--linger", type=float, default=0.1,
                    help="seconds to wait after a batch smaller than --batch-size before claiming again, so the "
                         "next forward pass takes the users queued meanwhile (fewer passes and store writes; "
                         "adds at most this to the refresh lag; default: 0.1; 0 claims at once)")
    rf.set_defaults(func=cmd_refresh)

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
                       description="Run the whole system on the built-in simulator: prepare, pretrain PANTHER and the "
                                   "transformer (at most --epochs epochs each, early stopping on validation) and "
                                   "the personal-frequency and Markov baselines, evaluate them side by side, train the fraud risk models, embed every user into SQLite, serve and "
                                   "score live transactions over HTTP, and write RUN_DIR/report.html.")
    d.add_argument("--epochs", type=int, default=DEMO_EPOCHS,
                   help=f"maximum training epochs per neural model, early stopping on validation NDCG@10 with "
                        f"patience 2 (default: {DEMO_EPOCHS})")
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
        args.store = f"sqlite:///{RunDir(args.run).states}"
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except PantherseqError as exc:
        message = " ".join(str(exc).splitlines())  # always one line
        print(f"pantherseq {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


TCMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc.so.4",
                  "/usr/lib64/libtcmalloc.so.4", "/usr/lib/libtcmalloc.so.4")
def _defaults_in_help(parser: argparse.ArgumentParser) -> None:
    """`pretrain --help` ends with every [model] / [train] key and its default, made when help is shown
    (so that building the parser does not import torch)."""
    plain = parser.format_help

    def with_defaults() -> str:
        from pantherseq.train.loop import pretrain_defaults

        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = "defaults (override with --set KEY=VALUE or a --config TOML file):\n" + pretrain_defaults()
        return plain()

    parser.format_help = with_defaults


HEAVY = {"pretrain", "evaluate", "demo", "fraud", "predict"}


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
