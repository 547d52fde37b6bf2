"""Learning-rate schedule: linear warmup from 0, then cosine decay to ``min_lr_ratio`` x peak (or constant).

Conventions (the same as Hugging Face's ``get_cosine_with_min_lr_schedule_with_warmup``, which the tests
compare against): ``step`` counts optimizer steps already taken, so the lr used by the first step is
``lr_at(0)``. With warmup the factor is ``step / warmup_steps``: the first step runs at lr 0 (AdamW still
accumulates its moment estimates) and the peak is reached at ``step == warmup_steps``. The cosine then runs
from the peak at ``warmup_steps`` to ``min_lr_ratio`` x peak at ``max_steps`` and stays there beyond it (a run
resumed with a larger step count does not see the lr rise again).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from vlp.config.schema import ScheduleConfig
from vlp.errors import ConfigError

__all__ = ["lr_factor", "lr_at", "build_scheduler", "steps_for_epochs"]


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str = "cosine",
              min_lr_ratio: float = 0.0) -> float:
    """The multiplier of the peak lr after ``step`` optimizer steps (a pure function)."""
    if schedule not in ("cosine", "constant"):
        raise ConfigError(f"schedule.type: unknown schedule '{schedule}'; known: cosine, constant")
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def lr_at(step: int, peak_lr: float, cfg: ScheduleConfig, max_steps: int) -> float:
    """The lr used by optimizer step ``step`` (0-based) under ``cfg``."""
    return peak_lr * lr_factor(step, cfg.warmup_steps, max_steps, cfg.type, cfg.min_lr_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, max_steps: int) -> LambdaLR:
    """A ``LambdaLR`` scaling every group's lr (its peak) by ``lr_factor``; call ``step()`` after each optimizer step.

    The multiplier is a closure, so the scheduler's state_dict holds only its counters (``last_epoch``):
    resuming with a changed ``max_steps`` or warmup follows the new config from the restored step.
    """
    if cfg.warmup_steps < 0:
        raise ConfigError(f"schedule.warmup_steps: must be >= 0, got {cfg.warmup_steps}")
    lr_factor(0, cfg.warmup_steps, max_steps, cfg.type, cfg.min_lr_ratio)  # validates the schedule name

    def factor(step: int) -> float:
        return lr_factor(step, cfg.warmup_steps, max_steps, cfg.type, cfg.min_lr_ratio)

    return LambdaLR(optimizer, factor)


def steps_for_epochs(epochs: int, loader: Any, grad_accum: int) -> int:
    """Optimizer steps of ``epochs`` passes over ``loader`` (train.epochs): the last step of the run ends
    the last epoch, a partial accumulation group counting as a step."""
    try:
        batches = len(loader)
    except TypeError:
        raise ConfigError("train.epochs: the training data has no known size (a stream without "
                          "data.samples_per_epoch); set train.max_steps instead") from None
    if batches == 0:
        raise ConfigError("train.epochs: the training data gives no batch per epoch")
    return max(1, math.ceil(epochs * batches / grad_accum))
