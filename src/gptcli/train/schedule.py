"""The learning rate as a pure function of the optimizer step, so a resumed run needs no scheduler state.

Linear warmup to `lr` over `warmup_steps`, step k (0-based) using lr*(k+1)/warmup_steps, so the first
update already uses lr/warmup_steps and none uses 0 (GPT-2 reproductions use a few hundred steps; GPT-1 used
2,000, Radford et al. 2018, section 4.1), then a decay to `min_lr` at `max_steps`: half a cosine (GPT-1's
schedule; Loshchilov & Hutter 2017 without restarts), a straight line, or none ("constant" holds `lr`).
"""

from __future__ import annotations

import math
from typing import Callable


def learning_rate(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int,
                  schedule: str = "cosine") -> float:
    """Learning rate for optimizer step `step` (0-based: the first update is step 0)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    decay_steps = max(max_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    if schedule == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    if schedule == "linear":
        return lr - progress * (lr - min_lr)
    raise ValueError(f"unknown schedule {schedule!r}")


def schedule_for(train) -> Callable[[int], float]:
    """The schedule of a [train] section as a function of the step."""
    return lambda step: learning_rate(step, lr=train.lr, min_lr=train.min_lr, warmup_steps=train.warmup_steps,
                                      max_steps=train.max_steps, schedule=train.lr_schedule)
