"""Next-behaviour evaluation (SPEC §6): full ranking over the vocabulary, per example, sum and count.

One function serves in-training validation and the final `pantherseq evaluate`: `evaluate_split`
ranks every target of a split (or of a seeded subset of users) with any registry model, and under
torchrun each rank takes every world-th window and the sums are all-reduced.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from pantherseq.data.dataset import RunData
from pantherseq.data.schema import PAD
from pantherseq.errors import ConfigError
from pantherseq.eval.metrics import METRICS, MetricSum, ranks
from pantherseq.model.base import SequenceModel
from pantherseq.run import RunDir

SCORE_BUDGET = 40_000_000  # score-matrix entries per evaluation batch (~160 MB of float32)


def eval_batch_size(vocab_size: int, max_len: int) -> int:
    """Windows per evaluation batch so that targets x vocabulary stays within SCORE_BUDGET."""
    return max(1, SCORE_BUDGET // (vocab_size * max(max_len // 2, 1)))


@torch.no_grad()
def evaluate_split(model: SequenceModel, data: RunData, split: str, max_len: int,
                   max_users: int | None = None, seed: int = 0, rank: int = 0, world: int = 1,
                   progress: bool = False) -> dict[str, float]:
    """HR@1/5/10, NDCG@5/10, MRR and n over the targets of `split` (see data/dataset.py), and HR@10, NDCG@10
    and n over the `repeat` targets (the token occurred earlier in the user's sequence) and the `explore`
    ones (new to the user), so a table shows where a model wins."""
    was_training = model.training
    model.eval()
    windows = data.eval_windows(split, max_len, max_users=max_users, seed=seed)[rank::world]
    size = eval_batch_size(data.info.vocab_size, max_len)
    acc, by_kind = MetricSum(), {"repeat": MetricSum(), "explore": MetricSum()}
    batches = data.eval_batches(windows, size, history=model.history_len)
    total = int(np.ceil(len(windows) / size))
    for batch in tqdm(batches, total=total, desc=f"evaluate {split}", disable=None if progress else True, leave=False):
        scores, targets = model.target_scores(batch)
        if targets.numel():
            r = ranks(scores, targets)
            acc.add(r)
            repeat = batch.target_repeat[batch.targets != PAD]
            by_kind["repeat"].add(r[repeat])
            by_kind["explore"].add(r[~repeat])
    if world > 1:
        acc, by_kind = _all_reduce(acc), {k: _all_reduce(v) for k, v in by_kind.items()}
    model.train(was_training)
    out = acc.result()
    for kind, m in by_kind.items():  # targets already in the user's history vs new to the user
        res = m.result()
        out |= {f"{kind}_{k}": res[k] for k in ("hr@10", "ndcg@10", "n")}
    return out


def _all_reduce(acc: MetricSum) -> MetricSum:
    t = acc.tensor()
    dist.all_reduce(t)
    return MetricSum.from_tensor(t)


def evaluate_run(run_dir: RunDir | str | Path, models: list[str] | None = None, splits: tuple[str, ...] = ("test",),
                 progress: bool = True, max_users: int | None = None, seed: int = 0
                 ) -> dict[str, dict[str, dict[str, float]]]:
    """Evaluate every trained model (or `models`) of a run on `splits`; merge into RUN_DIR/eval.json.

    `max_users` evaluates the targets of a seeded subset of users (the same subset for every model)."""
    from pantherseq.train.checkpoint import load_model  # train imports this module: load lazily

    run = RunDir.of(run_dir).require()
    trained = run.trained_models()
    names = models or trained
    missing = [m for m in names if m not in trained]
    if missing:
        raise ConfigError(f"no trained model {missing} in {run.models} (trained: {trained or 'none'})")
    data = RunData(run.path)
    results = run.read_eval() or {}
    for name in names:
        model, ckpt = load_model(run, name)
        max_len = ckpt["model_config"]["max_len"]
        for split in splits:
            res = evaluate_split(model, data, split, max_len, max_users=max_users, seed=seed, progress=progress)
            results.setdefault(name, {})[split] = {**res, "users": max_users or data.n_users}
    run.eval_report.write_text(json.dumps(results, indent=1))
    return results


def format_table(results: dict, split: str = "test") -> str:
    head = f"{'model':<14}" + "".join(f"{m:>9}" for m in METRICS) + f"{'n':>9}"
    lines = [head, "-" * len(head)]
    for name, by_split in results.items():
        r = by_split.get(split)
        if r:
            lines.append(f"{name:<14}" + "".join(f"{r[m]:>9.4f}" for m in METRICS) + f"{r['n']:>9,}")
    return "\n".join(lines)
