"""Does a PANTHER trained with the probed label in its profile leak it? (docs/BENCHMARKS.md, user level)

    .venv/bin/python benchmarks/profile_leak.py [--run runs/bench-userlevel/movielens100k] [--budget-s 240]

On a MovieLens-100k run prepared by benchmarks/userlevel.py (its `transformer` already trained), trains
`panther-profile` (PANTHER with its profile — age, gender, occupation — as input, the next-event benchmark's
sizes) unless present, then probes gender (LightGBM 500 rounds, stratified 5-fold, seed 0) on two views of
each model with the population-mean profile at embedding time: the mean causal state (`pantherseq probe`'s
embedding) and the mean *input token embedding* over each user's history. Writes
benchmarks/results/profile_leak.json. `pantherseq probe` itself refuses `panther-profile` on gender; this
script reads the weights directly to show why.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nextevent import DATASETS as NEXTEVENT
from nextevent import REPO, pretrain

from pantherseq.data.dataset import RunData
from pantherseq.eval.probe import probe, user_targets
from pantherseq.eval.representation import _ConstantProfile, history_ends, user_windows
from pantherseq.train.checkpoint import load_model


@torch.no_grad()
def views(run: Path, name: str) -> dict[str, np.ndarray]:
    """{"mean state": (U, D), "mean token embedding": (U, D)} over each user's whole history."""
    model, _ = load_model(run, name)
    data = RunData(run)
    if getattr(model, "profile", None) is not None:
        everyone = SimpleNamespace(profile_cat=data.profile.cat, profile_num=data.profile.num)
        model.profile = _ConstantProfile(model.profile(everyone).mean(0))
    seq = data.seq
    start, length, user = user_windows(np.asarray(seq.offsets), history_ends(seq.offsets, seq.split, "all"),
                                       model.cfg.max_len)
    U, D = seq.n_users, model.cfg.d_model
    state, token, weight = np.zeros((U, D)), np.zeros((U, D)), np.zeros(U)
    for i in range(0, len(start), 256):
        sl = slice(i, i + 256)
        b = data._batch(start[sl], length[sl])
        m = b.mask.unsqueeze(-1).double()
        np.add.at(state, user[sl], (model.hidden(b).double() * m).sum(1).numpy())
        np.add.at(token, user[sl], (model.token_emb(b.tokens).double() * m).sum(1).numpy())
        np.add.at(weight, user[sl], length[sl])
    return {"mean state": state / weight[:, None], "mean token embedding": token / weight[:, None]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(REPO / "runs" / "bench-userlevel" / "movielens100k"))
    parser.add_argument("--budget-s", type=int, default=240, help="panther-profile training seconds")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "profile_leak.json"))
    args = parser.parse_args()
    run = Path(args.run)
    if not (run / "models" / "panther-profile").is_dir():
        pretrain(run, "panther", NEXTEVENT["movielens100k"]["sets"], args.budget_s, name="panther-profile")
    users, y = user_targets(run, "gender")
    results = {}
    for name in ("panther-profile", "transformer"):
        for view, X in views(run, name).items():
            r = probe(X[users].astype(np.float32), y, "binary", folds=5, seed=0)
            results[f"{name}: {view}"] = [round(r["mean"], 4), round(r["std"], 4)]
            print(f"{name + ': ' + view:<45} gender ROC-AUC {r['mean']:.4f} ± {r['std']:.4f}", flush=True)
    Path(args.out).write_text(json.dumps({"run": str(run), "budget_s": args.budget_s, "gender_auc": results,
                                          "protocol": "LightGBM 500 rounds, stratified 5-fold, seed 0"}, indent=1)
                              + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
