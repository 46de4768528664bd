"""RecBole 1.2.1's SASRec on a prepared run's own leave-last-out split, under a wall-clock training budget.

    bash benchmarks/bench-env.sh        # builds .venv-bench (RecBole needs numpy<2, pandas<2.3)
    .venv-bench/bin/python benchmarks/recbole_sasrec.py --run RUN_DIR --budget-s 600 --out OUT.json

What is run, and how it is kept comparable with `pantherseq pretrain` (train/loop.py, eval/metrics.py):
- Data: RUN_DIR/events.parquet, whose row order is the order. The events are written to RecBole atomic
  files with `timestamp` = the event's rank within its user (0, 1, 2, ...), so RecBole's time ordering
  reproduces ours exactly, ties included. No filtering. RecBole trains on every prefix of every user
  (its data augmentation: ≤ max_len previous items -> next item) and splits by leave-one-out on the
  prefixes: per user the last target is test, the second-last valid. `split_check` proves, per row, that
  RecBole's train/valid/test targets and their input histories are ours; any mismatch aborts the run.
- Model: SASRec with RecBole's defaults (dropout 0.5, inner size 4d, GELU, Adam 1e-3, batch 2048,
  cross-entropy over all items) except d / layers / heads / max length from the command line. Autograd
  anomaly detection, which importing RecBole's models switches on for every model (sine.py), is switched
  off again unless --anomaly-detection: it changes no number, only the speed.
- Budget: training time is the time spent in training batches (loading, forward, backward, step), not in
  validation. Training stops after the batch that takes it past --budget-s, even mid-epoch (one epoch
  of RecBole's SASRec on ML-100k takes minutes); the partial epoch is then validated like a full one.
  Without the budget, RecBole's own early stopping (valid NDCG@10, --stopping-step) or --epochs stops it.
  The best-validation weights are kept (in memory) and tested.
- Ranking: full ranking over every item. RecBole masks only its padding id 0; for sequential models its
  FullSortEvalDataLoader passes no history, so a user's already-seen items are NOT masked — as in ours.
- Metrics: the top-level hr@K / ndcg@K / mrr come from `pantherseq.eval.metrics` applied to the full
  score vector of `SASRec.full_sort_predict` (MRR over the full ranking, not truncated at 10). RecBole's
  own Hit/NDCG/MRR@K on the same weights are kept under "recbole_test" as a cross-check.
- Throughput: `train_events_per_s` = training targets / train_s, a target being one (prefix, next item)
  sample: RecBole's SASRec takes its loss at the last position only, although it encodes all ≤ max_len
  input positions of each sample; `train_positions_per_s` counts those non-padding input positions.
- peak_mb: the process's peak resident memory (ru_maxrss), dataset building included, as in ours.
"""

from __future__ import annotations

import os

# As in pantherseq.cli: OpenMP busy-waiting collapses 2-thread torch under load. Must precede torch's import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import logging
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender import SASRec
from recbole.trainer import Trainer
from recbole.utils import init_seed

from pantherseq.eval.metrics import METRICS, MetricSum, ranks

log = logging.getLogger("recbole_sasrec")
NAME = "pantherseq"  # the RecBole dataset name: DATA_PATH/NAME/NAME.inter
RECBOLE_PAD = 0  # RecBole's padding item id, the only id that is never a candidate


# --- our split -> RecBole atomic files ------------------------------------------------------------------

def load_events(run: Path) -> pl.DataFrame:
    """user_id, item, split, rank (0-based position within the user, in file order = THE order)."""
    events = pl.read_parquet(run / "events.parquet", columns=["user_id", "item", "split"])
    return events.with_columns(pl.int_range(pl.len()).over("user_id").alias("rank"))


def write_atomic(events: pl.DataFrame, data_path: Path) -> Path:
    """Write DATA_PATH/NAME/NAME.inter (tab-separated, typed header) with timestamp = rank."""
    folder = data_path / NAME
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{NAME}.inter"
    events.select(pl.col("user_id").alias("user_id:token"), pl.col("item").alias("item_id:token"),
                  pl.col("rank").cast(pl.Float64).alias("timestamp:float")
                  ).write_csv(path, separator="\t")
    return path


def recbole_config(args: argparse.Namespace, data_path: Path) -> dict:
    return {
        "data_path": str(data_path), "checkpoint_dir": str(data_path / "saved"),
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
        "rm_dup_inter": None, "val_interval": None, "normalize_all": False,
        "MAX_ITEM_LIST_LENGTH": args.max_len,
        "hidden_size": args.d, "inner_size": 4 * args.d, "n_layers": args.layers, "n_heads": args.heads,
        "hidden_dropout_prob": args.dropout, "attn_dropout_prob": args.dropout,
        "loss_type": "CE", "train_neg_sample_args": None,
        "epochs": args.epochs, "train_batch_size": args.batch_size, "learning_rate": args.lr,
        "stopping_step": args.stopping_step, "eval_step": 1,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["Hit", "NDCG", "MRR"], "topk": [1, 5, 10], "valid_metric": "NDCG@10",
        "eval_batch_size": 4096,
        "seed": args.seed, "reproducibility": True, "use_gpu": False, "worker": 0, "shuffle": True,
        "show_progress": False, "log_wandb": False, "save_dataset": False, "save_dataloaders": False,
    }


# --- proof that RecBole's split is ours ------------------------------------------------------------------

def _recbole_rows(part, dataset) -> dict:
    """One RecBole part's rows: user token, target rank and item id, input history (RecBole item ids)."""
    inter = part.inter_feat
    uid = inter["user_id"].numpy()
    users = dataset.field2id_token["user_id"][uid]
    rank = inter["timestamp"].numpy()
    if not np.array_equal(rank, np.round(rank)):
        raise SystemExit("split check: RecBole changed the rank timestamps (normalisation?)")
    rank = rank.astype(np.int64)
    frame = pl.DataFrame({"user_id": users.astype(str), "rank": rank, "rb_item": inter["item_id"].numpy()})
    return {"frame": frame, "rank": rank, "hist": inter["item_id_list"].numpy(),
            "hist_len": inter["item_length"].numpy()}


def _history_mismatches(rows: dict, user_pos: np.ndarray, our_ids: np.ndarray, offsets: np.ndarray,
                        max_len: int) -> int:
    """Rows whose input history is not our last min(max_len, rank) items before the target."""
    rank, hist, length = rows["rank"], rows["hist"], rows["hist_len"]
    expect_len = np.minimum(rank, max_len)
    j = np.arange(hist.shape[1])[None, :]  # (1, max_len)
    start = offsets[user_pos] + rank - expect_len  # first history event, as an index into our_ids
    idx = np.where(j < expect_len[:, None], start[:, None] + j, -1)
    expected = np.where(idx >= 0, our_ids[np.maximum(idx, 0)], RECBOLE_PAD)
    bad = (length != expect_len) | (hist != expected).any(1)
    return int(bad.sum())


def split_check(events: pl.DataFrame, dataset, parts: list, max_len: int) -> dict:
    """Per row of RecBole's train/valid/test: same user, same target item, same split, same history."""
    token2id = dataset.field2token_id["item_id"]
    ours = events.with_columns(pl.col("item").replace_strict(token2id, return_dtype=pl.Int64).alias("rb_item"))
    users = ours.group_by("user_id", maintain_order=True).agg(pl.len().alias("n"))
    if events["user_id"].rle_id().max() + 1 != users.height:
        raise SystemExit("events.parquet does not hold each user's events contiguously")
    offsets = np.concatenate([[0], np.cumsum(users["n"].to_numpy().astype(np.int64))[:-1]])
    user_pos = dict(zip(users["user_id"].to_list(), range(users.height)))
    our_ids = ours["rb_item"].to_numpy()
    report: dict = {"users": users.height}
    frames = []
    for split, part in enumerate(parts):
        rows = _recbole_rows(part, dataset)
        joined = rows["frame"].join(ours.select("user_id", "rank", "split", pl.col("rb_item").alias("our")),
                                    on=["user_id", "rank"], how="left")
        bad = joined.filter(pl.col("our").is_null() | (pl.col("our") != pl.col("rb_item"))
                            | (pl.col("split") != split))
        pos = np.array([user_pos[u] for u in rows["frame"]["user_id"].to_list()])
        name = ("train", "valid", "test")[split]
        report[f"{name}_rows"] = rows["frame"].height
        report[f"{name}_users"] = rows["frame"]["user_id"].n_unique()
        report[f"{name}_target_mismatches"] = bad.height
        report[f"{name}_history_mismatches"] = _history_mismatches(rows, pos, our_ids, offsets, max_len)
        frames.append(rows["frame"].select("user_id", "rank"))
    # every event except each user's first (no history, so no sample) is a target exactly once
    report["expected_rows"] = events.height - users.height
    targets = pl.concat(frames)
    report["duplicate_rows"] = targets.height - targets.unique().height
    report["missing_rows"] = report["expected_rows"] - targets.unique().height
    report["mismatches"] = (sum(v for k, v in report.items() if k.endswith("mismatches"))
                            + report["duplicate_rows"] + abs(report["missing_rows"])
                            + sum(report[f"{s}_users"] != users.height for s in ("valid", "test")))
    if report["mismatches"]:
        raise SystemExit(f"split check FAILED: RecBole's split differs from events.parquet: {report}")
    return report


# --- training under a budget -----------------------------------------------------------------------------

class BudgetExhausted(Exception):
    """Raised from fit()'s end-of-epoch callback, after validation, once the training budget is spent."""


class _Budgeted:
    """A RecBole train loader that times and counts its batches and ends the epoch once the budget is spent."""

    def __init__(self, loader, trainer: BudgetTrainer):
        self.loader, self.trainer = loader, trainer

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        t = self.trainer
        t0, done = time.perf_counter(), 0
        try:
            for batch in self.loader:
                t.targets += len(batch)
                t.positions += int(batch["item_length"].sum())
                yield batch  # the training step runs here
                done += 1
                if t.train_s + time.perf_counter() - t0 >= t.budget_s:
                    t.out_of_budget = True
                    break
        finally:
            t.train_s += time.perf_counter() - t0
            t.batches += done
            t.epochs_done += done / len(self.loader)


class BudgetTrainer(Trainer):
    """RecBole's Trainer with a wall-clock budget on training batches and the best weights kept in memory."""

    def __init__(self, config, model, budget_s: float):
        super().__init__(config, model)
        self.budget_s = budget_s
        self.train_s, self.epochs_done, self.batches, self.targets, self.positions = 0.0, 0.0, 0, 0, 0
        self.out_of_budget = False
        self.best_state, self.best_epoch = None, -1

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        return super()._train_epoch(_Budgeted(train_data, self), epoch_idx, loss_func, show_progress)

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):  # called by fit() on a better valid score
        self.best_state, self.best_epoch = copy.deepcopy(self.model.state_dict()), epoch

    def after_epoch(self, epoch_idx: int, valid_score: float) -> None:
        if self.out_of_budget:
            raise BudgetExhausted

    def run(self, train_data, valid_data, max_epochs: int) -> str:
        """Train; load the best-validation weights; return why training stopped."""
        try:
            self.fit(train_data, valid_data, verbose=True, saved=True, callback_fn=self.after_epoch)
            reason = "max_epochs" if self.epochs_done >= max_epochs else "early_stopping"
        except BudgetExhausted:
            reason = "budget"
        self.model.load_state_dict(self.best_state)
        return reason


# --- evaluation ------------------------------------------------------------------------------------------

@torch.no_grad()
def rank_split(model, loader) -> dict:
    """Our metrics (eval/metrics.py) from SASRec's full score vectors over all items; seen items unmasked."""
    model.eval()
    acc = MetricSum()
    for interaction, history, _, targets in loader:
        assert history is None  # RecBole passes no seen-item mask for sequential models
        scores = model.full_sort_predict(interaction)  # (B, V) V = 1 + number of items, 0 = PAD
        acc.add(ranks(scores, targets, exclude=RECBOLE_PAD + 1))
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in acc.result().items()}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- entry point -----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, type=Path, help="a run directory written by `pantherseq prepare`")
    p.add_argument("--budget-s", required=True, type=float, help="wall-clock budget for training batches")
    p.add_argument("--out", required=True, type=Path, help="where to write the JSON result")
    p.add_argument("--epochs", type=int, default=1000, help="maximum epochs (the budget usually stops first)")
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--dropout", type=float, default=0.5, help="RecBole's SASRec default")
    p.add_argument("--batch-size", type=int, default=2048, help="RecBole's default")
    p.add_argument("--lr", type=float, default=1e-3, help="RecBole's default (Adam)")
    p.add_argument("--stopping-step", type=int, default=10, help="RecBole's early stopping: stop after "
                   "stopping_step + 1 epochs without a better valid NDCG@10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--anomaly-detection", action="store_true", help="keep autograd anomaly detection on, "
                   "as importing RecBole's models leaves it (slower; off by default)")
    return p.parse_args(argv)


def build(args: argparse.Namespace, work: Path):
    """Our events -> atomic files -> RecBole's config, dataset and train/valid/test loaders."""
    events = load_events(args.run)
    write_atomic(events, work / "data")
    argv, sys.argv = sys.argv, sys.argv[:1]  # RecBole's Config would also read `--key=value` from argv
    try:
        config = Config(model="SASRec", dataset=NAME, config_dict=recbole_config(args, work / "data"))
    finally:
        sys.argv = argv
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    loaders = data_preparation(config, dataset)
    return events, config, dataset, loaders


def describe(args: argparse.Namespace, model, dataset) -> dict:
    return {**{k: v for k, v in vars(args).items() if k not in ("run", "out")}, "run": str(args.run),
            "inner_size": 4 * args.d, "loss": "CE", "optimizer": "adam", "valid_metric": "NDCG@10",
            "seen_items_masked": False, "n_items": int(dataset.item_num) - 1,
            "n_params": sum(p.numel() for p in model.parameters()), "torch_threads": torch.get_num_threads(),
            "env": {k: os.environ.get(k) for k in ("LD_PRELOAD", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}}


def run(args: argparse.Namespace, work: Path) -> dict:
    started = time.perf_counter()
    events, config, dataset, (train_data, valid_data, test_data) = build(args, work)
    check = split_check(events, dataset, [d._dataset for d in (train_data, valid_data, test_data)],
                        args.max_len)
    log.info("split check passed: %s", check)
    # importing recbole.model.sequential_recommender runs sine.py's set_detect_anomaly(True), which turns
    # autograd anomaly detection on for every RecBole model: a debugging aid that slows SASRec's steps
    torch.autograd.set_detect_anomaly(args.anomaly_detection)
    init_seed(config["seed"], config["reproducibility"])
    model = SASRec(config, train_data._dataset).to(config["device"])
    trainer = BudgetTrainer(config, model, args.budget_s)
    reason = trainer.run(train_data, valid_data, args.epochs)
    test = rank_split(model, test_data)
    recbole_test = trainer.evaluate(test_data, load_best_model=False)
    return {
        "model": "recbole-1.2.1-SASRec", **{k: test[k] for k in (*METRICS, "n")},
        "valid": rank_split(model, valid_data),
        "recbole_test": {k: round(float(v), 6) for k, v in recbole_test.items()},
        "train_s": round(trainer.train_s, 2), "epochs": round(trainer.epochs_done, 3),
        "best_epoch": trainer.best_epoch + 1, "stop_reason": reason, "batches": trainer.batches,
        "train_targets": trainer.targets, "train_events_per_s": round(trainer.targets / trainer.train_s, 1),
        "train_positions_per_s": round(trainer.positions / trainer.train_s, 1),
        "peak_mb": round(peak_mb(), 1), "budget_s": args.budget_s,
        "wall_s": round(time.perf_counter() - started, 2),
        "config": describe(args, model, dataset), "split_check": check,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # RecBole's own torch.load of its pickled checkpoints (unused here: the best weights stay in memory)
    # needs this with torch >= 2.6; torch reads it at each call.
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    args.run, args.out = args.run.resolve(), args.out.resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning, module="recbole")  # pandas 3 notices
    home = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="recbole_sasrec_") as tmp:
        os.chdir(tmp)  # RecBole writes log_tensorboard/ and saved/ under the working directory
        try:
            result = run(args, Path(tmp))
        finally:
            os.chdir(home)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("config", "split_check", "valid")}))


if __name__ == "__main__":
    main()
