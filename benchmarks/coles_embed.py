"""pytorch-lifestream's CoLES on a prepared run's sequences, under a wall-clock budget -> embeddings.npy.

    bash benchmarks/bench-env.sh        # builds .venv-bench (pytorch-lifestream 0.7.0 beside torch 2.13)
    .venv-bench/bin/python benchmarks/coles_embed.py --run RUN_DIR --budget-s 180 [--out FILE.npy]

What is run, and how it is kept comparable with `pantherseq pretrain` + `pantherseq probe`:
- Data: RUN_DIR/sequences (the memory-mapped arrays our models read, user_idx order), one record per
  user: `token` (the structured token our models embed; `--codes` adds each token field's code as its
  own categorical feature) and `event_time`. Training uses each user's events up to the end of the
  training period only, as `pantherseq pretrain` does; the embeddings are computed on every event.
- Model: ptls `CoLESModule` (contrastive loss, margin 0.5, hard negatives, L2-normalised head: its
  defaults) over `RnnSeqEncoder` (TrxEncoder embedding -> GRU, last hidden state) with ptls's
  `ColesDataset` + `SplitRandom` (each user's events dealt at random into `--split-count`
  subsequences of at most `--cnt-max` events; the subsequences of one user are the positives).
  Adam, StepLR(30, 0.9) as in ptls's examples.
- Budget: Lightning's Timer stops training after the step that passes --budget-s of training time
  (data loading included; there is no validation).
- Output: --out (default RUN_DIR/coles/embeddings.npy), row i = user_idx i, the GRU's final state over
  the user's whole history (ptls's inference); beside it coles.json (settings, epochs, steps, time).
"""

from __future__ import annotations

import os

# As in pantherseq.cli: OpenMP busy-waiting collapses 2-thread torch under load. Must precede torch's import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
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
from ptls.frames.coles.split_strategy import SplitRandom
from ptls.nn import RnnSeqEncoder, TrxEncoder

from pantherseq.data.sequences import Sequences
from pantherseq.eval.representation import history_ends
from pantherseq.tokenizer import StructuredTokenizer

log = logging.getLogger("coles_embed")


def records(seq: Sequences, ends: np.ndarray, codes: bool, min_events: int = 1) -> tuple[list[dict], np.ndarray]:
    """ptls feature dicts of [offsets[u], ends[u]) for users with >= min_events events, and their user_idx."""
    users = np.flatnonzero(ends - seq.offsets[:-1] >= min_events)
    tokens, times = np.asarray(seq.tokens), np.asarray(seq.time)
    field_codes = np.asarray(seq.codes) if codes else None
    out = []
    for u in users.tolist():
        s, e = int(seq.offsets[u]), int(ends[u])
        rec = {"token": torch.from_numpy(tokens[s:e].astype(np.int64)),
               "event_time": torch.from_numpy(times[s:e].astype(np.float64))}
        if field_codes is not None:
            for f, name in enumerate(seq.field_names):
                rec[f"code_{name}"] = torch.from_numpy(field_codes[s:e, f].astype(np.int64))
        out.append(rec)
    return out, users


def build_module(args: argparse.Namespace, tok: StructuredTokenizer, field_names: list[str]) -> CoLESModule:
    embeddings = {"token": {"in": tok.vocab_size, "out": args.emb}}
    if args.codes:
        embeddings.update({f"code_{n}": {"in": size, "out": max(4, min(args.emb // 4, size))}
                           for n, size in zip(field_names, tok.field_sizes)})
    trx = TrxEncoder(embeddings=embeddings, embeddings_noise=0.003)
    encoder = RnnSeqEncoder(trx_encoder=trx, hidden_size=args.hidden, type="gru")
    return CoLESModule(seq_encoder=encoder,
                       optimizer_partial=partial(torch.optim.Adam, lr=args.lr, weight_decay=0.0),
                       lr_scheduler_partial=partial(torch.optim.lr_scheduler.StepLR, step_size=30, gamma=0.9))


def train(module: CoLESModule, data: list[dict], args: argparse.Namespace) -> dict:
    dataset = ColesDataset(data=data, splitter=SplitRandom(split_count=args.split_count, cnt_min=args.cnt_min,
                                                           cnt_max=args.cnt_max))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=0,
                                         collate_fn=ColesDataset.collate_fn, drop_last=len(data) > args.batch_size)
    trainer = pl.Trainer(max_epochs=args.max_epochs, max_time=timedelta(seconds=args.budget_s), accelerator="cpu",
                         devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    started = time.perf_counter()
    trainer.fit(module, loader)
    train_s = time.perf_counter() - started
    return {"train_s": round(train_s, 1), "epochs": round(trainer.global_step / max(len(loader), 1), 2),
            "steps": trainer.global_step, "loss": float(trainer.callback_metrics.get("loss", float("nan")))}


@torch.no_grad()
def embed(module: CoLESModule, data: list[dict], batch_size: int = 128) -> np.ndarray:
    encoder = module.seq_encoder.eval()
    out = [encoder(collate_feature_dict(data[i:i + batch_size])).numpy() for i in range(0, len(data), batch_size)]
    return np.concatenate(out).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run directory written by `pantherseq prepare`")
    parser.add_argument("--budget-s", type=float, required=True, help="training wall-clock seconds")
    parser.add_argument("--out", help="embeddings file (default RUN/coles/embeddings.npy)")
    parser.add_argument("--hidden", type=int, default=128, help="GRU size = embedding size (default 128)")
    parser.add_argument("--emb", type=int, default=64, help="token embedding size (default 64)")
    parser.add_argument("--codes", action="store_true", help="also embed each token field's code")
    parser.add_argument("--split-count", type=int, default=5)
    parser.add_argument("--cnt-min", type=int, default=5, help="SplitRandom's cnt_min (unused by ptls 0.7)")
    parser.add_argument("--cnt-max", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=64, help="users per batch (x split-count sequences)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-epochs", type=int, default=10_000)
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
    train_data, train_users = records(seq, history_ends(np.asarray(seq.offsets), seq.split, "train"), args.codes, 2)
    log.info("CoLES on %s: %d training users, budget %.0f s", run, len(train_users), args.budget_s)
    module = build_module(args, tok, seq.field_names)
    stats = train(module, train_data, args)
    all_data, users = records(seq, np.asarray(seq.offsets[1:]), args.codes)
    X = np.full((seq.n_users, args.hidden), np.nan, dtype=np.float32)
    X[users] = embed(module, all_data)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, X)
    info = {**stats, "train_users": len(train_users), "users": seq.n_users, "budget_s": args.budget_s,
            "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "settings": {k: v for k, v in vars(args).items() if k not in ("run", "out")}}
    out.with_name("coles.json").write_text(json.dumps(info, indent=1) + "\n")
    log.info("CoLES: %s epochs (%d steps) in %.0f s -> %s %s", info["epochs"], info["steps"], info["train_s"],
             out, X.shape)


if __name__ == "__main__":
    main()
