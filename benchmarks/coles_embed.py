"""pytorch-lifestream's CoLES on a prepared run's sequences, trained to convergence -> embeddings.npy.

    bash benchmarks/bench-env.sh        # builds .venv-bench (pytorch-lifestream 0.7.0 beside torch 2.13)
    .venv-bench/bin/python benchmarks/coles_embed.py --run RUN_DIR [--max-epochs 300 --patience 10] [--out FILE.npy]

What is run, and how it is kept comparable with `pantherseq pretrain` + `pantherseq probe`:
- Data: RUN_DIR/sequences (the memory-mapped arrays our models read, user_idx order), one record per
  user: `token` (the structured token our models embed; `--no-token` leaves it out) and each event field's
  code as its own categorical feature — by default every field of the run's config, item side-table fields
  included (MovieLens-100k: item, rating, genre, release_year, hour, weekday, log_gap), the inputs our
  models' field embeddings read; `--fields` names a subset (`--fields ''`: the token alone). `event_time`
  orders the events. Training uses each user's events up to the end of the training period only, as
  `pantherseq pretrain` does; the embeddings are computed on every event.
- Model: ptls `CoLESModule` (contrastive loss, margin 0.5, hard negatives, L2-normalised head: its
  defaults) over `RnnSeqEncoder` (TrxEncoder embedding -> GRU, last hidden state) with ptls's
  `ColesDataset` and, by default, `SampleSlices` (the CoLES paper's random slices, with ptls's usual
  settings: `--split-count` 5 contiguous windows of `--cnt-min` 25..`--cnt-max` 200 events of one user are
  its positives); `--split random` deals the events at random into the subsequences instead (`SplitRandom`).
  Adam, StepLR(30, 0.9) as in ptls's examples; `--batch-size` 16 users (x 5 windows) per step.
- Why these defaults (docs/BENCHMARKS.md, "CoLES settings"): on MovieLens-100k (943 users) the earlier
  `SplitRandom` with batches of 64 users (13 steps an epoch) gave gender AUC 0.55; contiguous slices and
  batches of 16 users give 0.67 on the same inputs, and 0.72 without the time fields (hour, weekday, gap:
  with them, the contrastive task is solved by when a user rates, not what), in line with the independent
  CoLES figure (0.747 / 0.731). Chosen by the probe among the variants there, so the CoLES rows are if anything
  optimistic; our models were not tuned on the probe.
- Convergence: a seeded `--valid-share` of the training users is held out; after every epoch the
  contrastive loss of their subsequences (split once, seeded, so every epoch scores the same batches) is
  computed, and training stops after `--patience` epochs without a lower one, or at `--max-epochs`; the
  best epoch's weights are kept. `--budget-s` is an optional wall-clock cap (none by default).
- Output: --out (default RUN_DIR/coles/embeddings.npy), row i = user_idx i, the GRU's final state over
  the user's whole history (ptls's inference); beside it coles.json (settings, epochs, best epoch, why it
  stopped, the held-out loss per epoch, training wall and CPU seconds).
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
import time
import warnings
from datetime import timedelta
from functools import partial
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from ptls.data_load.utils import collate_feature_dict
from ptls.frames.coles import ColesDataset, CoLESModule
from ptls.frames.coles.split_strategy import SampleSlices, SplitRandom
from ptls.nn import RnnSeqEncoder, TrxEncoder

from pantherseq.data.sequences import Sequences
from pantherseq.eval.representation import history_ends
from pantherseq.tokenizer import StructuredTokenizer

log = logging.getLogger("coles_embed")


def records(seq: Sequences, ends: np.ndarray, fields: list[str], token: bool = True,
            min_events: int = 1) -> tuple[list[dict], np.ndarray]:
    """ptls feature dicts of [offsets[u], ends[u]) for users with >= min_events events, and their user_idx:
    the token (if `token`) and the code of each field in `fields`."""
    users = np.flatnonzero(ends - seq.offsets[:-1] >= min_events)
    tokens, times = np.asarray(seq.tokens), np.asarray(seq.time)
    field_codes = np.asarray(seq.codes)
    columns = [(seq.field_names.index(name), name) for name in fields]
    out = []
    for u in users.tolist():
        s, e = int(seq.offsets[u]), int(ends[u])
        rec = {"event_time": torch.from_numpy(times[s:e].astype(np.float64))}
        if token:
            rec["token"] = torch.from_numpy(tokens[s:e].astype(np.int64))
        for f, name in columns:
            rec[f"code_{name}"] = torch.from_numpy(field_codes[s:e, f].astype(np.int64))
        out.append(rec)
    return out, users


def build_module(args: argparse.Namespace, tok: StructuredTokenizer, field_names: list[str]) -> CoLESModule:
    """CoLES over the token (if args.token, `--emb` wide) and the codes of args.fields (each at most --emb/4)."""
    embeddings = {"token": {"in": tok.vocab_size, "out": args.emb}} if args.token else {}
    sizes = dict(zip(field_names, tok.field_sizes))
    embeddings.update({f"code_{n}": {"in": sizes[n], "out": max(4, min(args.emb // 4, sizes[n]))}
                       for n in args.fields})
    trx = TrxEncoder(embeddings=embeddings, embeddings_noise=0.003)
    encoder = RnnSeqEncoder(trx_encoder=trx, hidden_size=args.hidden, type="gru")
    return CoLESModule(seq_encoder=encoder,
                       optimizer_partial=partial(torch.optim.Adam, lr=args.lr, weight_decay=0.0),
                       lr_scheduler_partial=partial(torch.optim.lr_scheduler.StepLR, step_size=30, gamma=0.9))


class HeldOutLoss(pl.Callback):
    """Early stopping on the contrastive loss of held-out users: after each epoch, the summed loss over the
    fixed `batches`; stops after `patience` epochs without a lower one and keeps the best epoch's weights."""

    def __init__(self, batches: list, patience: int, min_delta: float = 1e-3):
        self.batches, self.patience, self.min_delta = batches, patience, min_delta
        self.best, self.best_epoch, self.best_state, self.history = float("inf"), 0, None, []

    @torch.no_grad()
    def held_out_loss(self, module: CoLESModule) -> float:
        module.eval()
        loss = sum(float(module._loss(*module.shared_step(x, y))) for x, y in self.batches)
        module.train()
        return loss

    def on_train_epoch_end(self, trainer: pl.Trainer, module: CoLESModule) -> None:
        loss, epoch = self.held_out_loss(module), trainer.current_epoch + 1
        self.history.append(round(loss, 3))
        if loss < self.best * (1 - self.min_delta):  # a summed loss, > 0
            self.best, self.best_epoch = loss, epoch
            self.best_state = copy.deepcopy(module.state_dict())
        elif epoch - self.best_epoch >= self.patience:
            trainer.should_stop = True
        log.info("epoch %d: held-out loss %.2f (best %.2f, epoch %d)", epoch, loss, self.best, self.best_epoch)


def splitter(args: argparse.Namespace) -> SplitRandom | SampleSlices:
    """How a user's events become the positive subsequences: `random` deals every event at random into one of
    --split-count subsequences (each cut to --cnt-max); `slices` (the CoLES paper's random slices) takes
    --split-count contiguous windows of --cnt-min..--cnt-max events."""
    cls = SplitRandom if args.split == "random" else SampleSlices
    return cls(split_count=args.split_count, cnt_min=args.cnt_min, cnt_max=args.cnt_max)


def held_out_batches(data: list[dict], args: argparse.Namespace) -> list:
    """The held-out users' subsequences, split once (seeded) and collated in batches of --batch-size."""
    dataset = ColesDataset(data=data, splitter=splitter(args))
    np.random.seed(args.seed)
    items = [dataset[i] for i in range(len(dataset))]
    return [ColesDataset.collate_fn(items[i:i + args.batch_size]) for i in range(0, len(items), args.batch_size)]


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def train(module: CoLESModule, data: list[dict], held_out: list[dict], args: argparse.Namespace) -> dict:
    """Fit `module` on `data` until the held-out loss stops improving (or --max-epochs / --budget-s); the
    best epoch's weights are loaded back. Returns the cost and how it stopped."""
    dataset = ColesDataset(data=data, splitter=splitter(args))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=0,
                                         collate_fn=ColesDataset.collate_fn, drop_last=len(data) > args.batch_size)
    stopper = HeldOutLoss(held_out_batches(held_out, args), args.patience)
    max_time = timedelta(seconds=args.budget_s) if args.budget_s else None
    trainer = pl.Trainer(max_epochs=args.max_epochs, max_time=max_time, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[stopper])
    started, cpu0 = time.perf_counter(), cpu_seconds()
    trainer.fit(module, loader)
    train_s, cpu_s = time.perf_counter() - started, cpu_seconds() - cpu0
    epochs = len(stopper.history)
    if stopper.best_state is not None:
        module.load_state_dict(stopper.best_state)
    reason = ("patience" if epochs - stopper.best_epoch >= args.patience else
              "max_epochs" if epochs >= args.max_epochs else "budget_s")
    return {"train_s": round(train_s, 1), "cpu_s": round(cpu_s, 1), "epochs": epochs, "best_epoch": stopper.best_epoch,
            "stop_reason": reason, "steps": trainer.global_step, "s_per_epoch": round(train_s / max(epochs, 1), 2),
            "held_out_loss": stopper.history}


@torch.no_grad()
def embed(module: CoLESModule, data: list[dict], batch_size: int = 128) -> np.ndarray:
    encoder = module.seq_encoder.eval()
    out = [encoder(collate_feature_dict(data[i:i + batch_size])).numpy() for i in range(0, len(data), batch_size)]
    return np.concatenate(out).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run directory written by `pantherseq prepare`")
    parser.add_argument("--max-epochs", type=int, default=300, help="epoch cap (default 300)")
    parser.add_argument("--patience", type=int, default=10,
                        help="epochs without a lower held-out loss before stopping (default 10)")
    parser.add_argument("--valid-share", type=float, default=0.1, help="share of training users held out")
    parser.add_argument("--budget-s", type=float, help="optional training wall-clock cap (default none)")
    parser.add_argument("--out", help="embeddings file (default RUN/coles/embeddings.npy)")
    parser.add_argument("--hidden", type=int, default=128, help="GRU size = embedding size (default 128)")
    parser.add_argument("--emb", type=int, default=64, help="token embedding size (default 64)")
    parser.add_argument("--fields", help="comma-separated event fields whose codes are embedded (default: every "
                        "field of the run; '': none, the token alone)")
    parser.add_argument("--token", action=argparse.BooleanOptionalAction, default=True,
                        help="embed the structured token (default; --no-token: the field codes alone)")
    parser.add_argument("--split-count", type=int, default=5)
    parser.add_argument("--split", choices=("slices", "random"), default="slices",
                        help="positives: contiguous slices of a user's events (default) or random subsets")
    parser.add_argument("--cnt-min", type=int, default=25,
                        help="shortest slice (default 25; unused by --split random)")
    parser.add_argument("--cnt-max", type=int, default=200, help="longest slice or subsequence (default 200)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="users per batch (x split-count sequences; default 16)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True)

    run = Path(args.run)
    out = Path(args.out) if args.out else run / "coles" / "embeddings.npy"
    seq = Sequences.load(run / "sequences")
    tok = StructuredTokenizer.load(run / "tokenizer.json")
    if args.fields is not None:
        args.fields = [f.strip() for f in args.fields.split(",") if f.strip()]
        if unknown := sorted(set(args.fields) - set(seq.field_names)):
            parser.error(f"--fields: {', '.join(unknown)} not among the run's fields {', '.join(seq.field_names)}")
    else:
        args.fields = list(seq.field_names)
    if not args.token and not args.fields:
        parser.error("--no-token with no field codes leaves CoLES no input")
    inputs = ["token"] * args.token + args.fields
    train_data, _ = records(seq, history_ends(np.asarray(seq.offsets), seq.split, "train"), args.fields,
                            args.token, 2)
    held = np.random.default_rng(args.seed).random(len(train_data)) < args.valid_share
    fit, held_out = [r for r, h in zip(train_data, held) if not h], [r for r, h in zip(train_data, held) if h]
    if not held_out or not fit:
        parser.error(f"--valid-share {args.valid_share} leaves no held-out or no training user of {len(held)}")
    log.info("CoLES on %s: %d training users (%d held out for early stopping), inputs %s", run, len(fit),
             len(held_out), inputs)
    module = build_module(args, tok, seq.field_names)
    stats = train(module, fit, held_out, args)
    all_data, users = records(seq, np.asarray(seq.offsets[1:]), args.fields, args.token)
    X = np.full((seq.n_users, args.hidden), np.nan, dtype=np.float32)
    X[users] = embed(module, all_data)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, X)
    info = {**stats, "train_users": len(fit), "held_out_users": len(held_out), "users": seq.n_users,
            "inputs": inputs,
            "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "settings": {k: v for k, v in vars(args).items() if k not in ("run", "out")}}
    out.with_name("coles.json").write_text(json.dumps(info, indent=1) + "\n")
    log.info("CoLES: %d epochs (best %d, stopped by %s) in %.0f s -> %s %s", info["epochs"], info["best_epoch"],
             info["stop_reason"], info["train_s"], out, X.shape)


if __name__ == "__main__":
    main()
