"""The one trainer for every registry model (SPEC §5).

AdamW (weight decay on matrices only), warm-up + cosine, gradient clipping, seeded (python, numpy, torch;
the epoch's batch order is a function of (seed, epoch), so a resumed run sees the same batches), early
stopping on validation NDCG@10 (the best weights are kept), resume from `last.pt`, a wall-clock budget,
a progress bar with loss and events/s, and a JSON-lines log. Count models take one counting pass over
the same batches instead of gradient steps. `init_from` starts a neural model from another checkpoint
(train/warmstart.py) and records how in the metrics. A model with SPRM ends with its prototype analysis
(eval/prototypes.py -> RUN_DIR/prototypes.json).

Under `torchrun` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel over gloo, each rank
takes every world-th batch and every world-th evaluation window, metric sums are all-reduced, and only
rank 0 writes files.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from pantherseq.config import apply_overrides, build_config, load_toml
from pantherseq.data.dataset import RunData
from pantherseq.data.schema import PAD
from pantherseq.errors import ConfigError
from pantherseq.eval.nextevent import evaluate_split
from pantherseq.eval.prototypes import write_prototypes
from pantherseq.model.base import ModelConfig, SequenceModel
from pantherseq.model.registry import build_model, check_model
from pantherseq.run import RunDir
from pantherseq.train.checkpoint import load_checkpoint, save_checkpoint
from pantherseq.train.schedule import get_lr
from pantherseq.train.warmstart import InitSource, init_model_name, init_model_table, load_init, warm_start

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.05  # linear warm-up over this fraction of the run's steps (epochs x steps per epoch)
    warmup_steps: int | None = None  # an absolute number of warm-up steps instead of `warmup`
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0
    seed: int = 0
    # epochs without a better validation NDCG@10 before stopping; epochs that end inside the warm-up do not
    # count (a model still warming up may not have left 0 yet: a contrastive PANTHER stopped at epoch 9 so)
    patience: int = 3
    eval_max_users: int | None = 1000  # validate each epoch on a seeded subset of users (None = all)
    time_budget_s: float | None = None  # stop after the step that exceeds this training wall time
    threads: int | None = None  # torch threads (None = torch's default)
    log_every: int = 50
    # train on this seeded share of the training windows (data-efficiency studies: benchmarks/transfer.py);
    # validation and test are unchanged, and every window keeps its whole context
    data_fraction: float = 1.0

    def validate(self, where: str) -> None:
        if not 0.0 < self.data_fraction <= 1.0:
            raise ConfigError(f"{where}.data_fraction must be within (0, 1], got {self.data_fraction}")


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init_from: str | None = None  # RUN_DIR/models/NAME to fine-tune from (train/warmstart.py)


def pretrain_defaults() -> str:
    """Every [model] and [train] key with its default, one `section.key = value` per line (`pretrain --help`,
    docs/MODELS.md)."""
    import dataclasses

    lines = []
    for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
        for f in dataclasses.fields(cls):
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {section}.{f.name} = {value!r}")
    return "\n".join(lines)


def load_pretrain_config(file: str | Path | None = None, overrides: list[str] | None = None,
                         model: str | None = None, init_from: str | Path | InitSource | None = None
                         ) -> PretrainConfig:
    """`pantherseq pretrain`'s config: a TOML file with [model] and [train] tables, `key=value` overrides.
    `model`, when given, must be a registry model (checked before anything is trained or written). With
    `init_from` (or a top-level `init_from` key) the [model] table is the checkpoint's (train/warmstart.py:
    a conflicting architecture key is refused)."""
    if model is not None:
        check_model(model)
    where = str(file) if file else "config"
    raw = apply_overrides(load_toml(file) if file else {}, overrides)
    init = init_from if init_from is not None else raw.get("init_from")
    if init is not None:
        source = init if isinstance(init, InitSource) else load_init(init)
        given = raw.get("model", {})
        if not isinstance(given, dict):
            raise ConfigError(f"{where}: model must be a table, got {given!r}")
        raw["model"] = init_model_table(source, given)
        raw["init_from"] = str(source.path.parent if source.path.name == "checkpoint.pt" else source.path)
    return build_config(PretrainConfig, raw, where)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _dist() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


class Logger:
    """JSON lines on rank 0; nothing elsewhere."""

    def __init__(self, path: Path, enabled: bool, append: bool):
        self.fh = open(path, "a" if append else "w") if enabled else None  # noqa: SIM115 (closed by close())

    def __call__(self, **record: Any) -> None:
        if self.fh:
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.fh:
            self.fh.close()


@dataclass
class State:
    epoch: int = 0
    step: int = 0
    best: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    train_s: float = 0.0
    targets: int = 0
    history: list = field(default_factory=list)


def _fit_counts(model: SequenceModel, data: RunData, cfg: PretrainConfig) -> State:
    state = State()
    started = time.perf_counter()
    for batch in data.train_batches(cfg.model.max_len, cfg.train.batch_size, cfg.train.seed):
        model.observe(batch)
        state.targets += int((batch.targets != PAD).sum())
    model.finish()
    state.train_s, state.epoch = time.perf_counter() - started, 1
    return state


def _epoch(model, core, opt, data, cfg: PretrainConfig, state: State, total_steps: int, rank: int,
           world: int, logger: Logger, deadline: float | None) -> bool:
    """One pass over the training batches; returns False when the time budget ran out."""
    tc = cfg.train
    batches = data.train_batches(cfg.model.max_len, tc.batch_size, tc.seed * 1000 + state.epoch, rank, world,
                                 history=core.history_len, view_min=core.view_min)
    bar = tqdm(batches, desc=f"epoch {state.epoch + 1}", disable=None if rank == 0 else True, leave=False, mininterval=1.0)
    t0, n0 = time.perf_counter(), state.targets
    for batch in bar:
        lr = get_lr(state.step, total_steps, tc.lr, warmup_steps(tc, total_steps), tc.schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, parts = core.loss(batch) if world == 1 else model(batch)  # DDP all-reduces the gradients
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        state.step += 1
        state.targets += int((batch.targets != PAD).sum()) * world
        rate = (state.targets - n0) / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{loss.item():.4f}", ev_s=f"{rate:,.0f}")
        if state.step % tc.log_every == 0:
            logger(kind="step", step=state.step, epoch=state.epoch, lr=lr, loss=loss.item(), **parts,
                   events_per_s=rate)
        if deadline is not None and state.train_s + time.perf_counter() - t0 > deadline:
            state.train_s += time.perf_counter() - t0
            return False
    state.train_s += time.perf_counter() - t0
    return True


def warmup_steps(tc: TrainConfig, total_steps: int) -> int:
    """The warm-up length: `warmup_steps` when given, else the fraction `warmup` of the run's steps."""
    return int(tc.warmup_steps) if tc.warmup_steps is not None else round(tc.warmup * total_steps)


class _LossModule(torch.nn.Module):
    """DDP needs forward(): this makes forward() = loss() of the wrapped model."""

    def __init__(self, core: SequenceModel):
        super().__init__()
        self.core = core

    def forward(self, batch):
        return self.core.loss(batch)


def _validate(core, data, cfg: PretrainConfig, rank: int, world: int) -> dict:
    return evaluate_split(core, data, "valid", cfg.model.max_len, max_users=cfg.train.eval_max_users,
                          seed=cfg.train.seed, rank=rank, world=world)


def _resume(path: Path, core, opt, state: State) -> dict | None:
    ckpt = load_checkpoint(path)
    core.load_state_dict(ckpt["state_dict"])
    opt.load_state_dict(ckpt["optimizer"])
    for key, value in ckpt["trainer_state"].items():
        setattr(state, key, value)
    log.info("resumed from %s at epoch %d", path, state.epoch)
    return ckpt.get("best_state_dict")


def train(run_dir: RunDir | str | Path, model: str, cfg: PretrainConfig, resume: bool = False,
          name: str | None = None) -> dict[str, Any]:
    """Train registry model `model` on a prepared run; writes RUN_DIR/models/NAME/ (NAME defaults to the
    model: give another to keep variants, e.g. ablations, side by side) and, for a model with SPRM, its
    entry of RUN_DIR/prototypes.json. Returns the metrics."""
    name = name or model
    run = RunDir.of(run_dir).require()
    rank, world = _dist()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    data = RunData(run.path, train_fraction=cfg.train.data_fraction)
    info = data.info
    core = build_model(model, cfg.model, info)
    init = None
    if cfg.init_from:
        source = load_init(cfg.init_from)
        init_model_name(source, model)
        init = warm_start(core, source, run)
    run.model_dir(name).mkdir(parents=True, exist_ok=True)
    logger = Logger(run.train_log(name), rank == 0, append=resume)
    if not core.trainable:
        state = _fit_counts(core, data, cfg)
        best_state = None
    else:
        state, best_state = _train_neural(core, data, cfg, run, name, model, rank, world, logger, resume)
    if best_state is not None:
        core.load_state_dict(best_state)
    valid = _validate(core, data, cfg, rank, world)
    metrics = {
        "model": model, "name": name, "valid": valid, "epochs": state.epoch, "best_epoch": state.best_epoch + 1,
        "steps": state.step, "train_s": round(state.train_s, 2),
        "train_events_per_s": round(state.targets / max(state.train_s, 1e-9), 1),
        "train_targets": state.targets, "peak_mb": round(peak_mb(), 1), "world_size": world,
        "n_params": sum(p.numel() for p in core.parameters()),
        **({"init_from": init} if init is not None else {}),
    }
    logger(kind="final", **metrics)
    logger.close()
    if rank == 0:
        save_checkpoint(run.checkpoint(name), core, model, cfg.model, info, run.path, cfg.train, metrics)
        run.model_metrics(name).write_text(json.dumps(metrics, indent=1))
        write_prototypes(run, name, core, data)
    if world > 1:
        dist.barrier()
        # gloo's worker threads left to interpreter teardown can hang the exit (a CI run hung 300 s after
        # training finished); the documented shutdown is every rank destroying the group once done
        dist.destroy_process_group()
    return metrics


def _train_neural(core, data, cfg: PretrainConfig, run: RunDir, name: str, model_name: str, rank: int,
                  world: int, logger: Logger, resume: bool):
    tc = cfg.train
    model = core
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(_LossModule(core), find_unused_parameters=True)
    opt = _optimizer(core, tc)
    state = State()
    best_state = None
    last = run.checkpoint(name, "last")
    if resume and last.is_file():
        best_state = _resume(last, core, opt, state)
    steps_per_epoch = max(1, data.train_steps(cfg.model.max_len, tc.batch_size, world))  # training windows only
    total_steps = tc.epochs * steps_per_epoch
    warm = warmup_steps(tc, total_steps)
    while state.epoch < tc.epochs:
        finished = _epoch(model, core, opt, data, cfg, state, total_steps, rank, world, logger,
                          tc.time_budget_s)
        state.epoch += 1
        valid = _validate(core, data, cfg, rank, world)
        score = valid["ndcg@10"]
        improved = score > state.best
        if improved:
            state.best, state.best_epoch, state.bad_epochs = score, state.epoch - 1, 0
            best_state = copy.deepcopy(core.state_dict())
        elif state.step >= warm:
            state.bad_epochs += 1
        state.history.append({"epoch": state.epoch, **valid})
        logger(kind="epoch", epoch=state.epoch, step=state.step, train_s=round(state.train_s, 2),
               valid=valid, best_epoch=state.best_epoch + 1)
        if rank == 0:
            log.info("%s epoch %d: valid NDCG@10 %.4f HR@10 %.4f (best %.4f at epoch %d)", name, state.epoch,
                     score, valid["hr@10"], state.best, state.best_epoch + 1)
            save_checkpoint(last, core, model_name, cfg.model, data.info, run.path, tc, valid, extra={
                "optimizer": opt.state_dict(), "best_state_dict": best_state,
                "trainer_state": {k: v for k, v in vars(state).items()}})
        if not finished or state.bad_epochs >= tc.patience:
            break
    return state, best_state
