"""Learning-rate schedules: linear warm-up then cosine decay to `min_lr_ratio`, or constant."""

from __future__ import annotations

import math


def get_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int, schedule: str,
           min_lr_ratio: float = 0.1) -> float:
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
