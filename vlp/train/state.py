"""What a training run carries: the resumable counters (``TrainState``) and the parts it trains (``TrainingJob``).

Both live below the loop, so the fault checks and the trainer-state saver read them without importing it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from vlp.objectives.base import Objective
from vlp.train.sampler import ResumableSampler

__all__ = ["TrainState", "TrainingJob"]


@dataclass
class TrainState:
    """Counters that make a run resumable: optimizer steps, epoch and position inside it, data faults."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    loss_finite: bool = True  # the current step's loss (all ranks); a non-finite one skips the step
    bad_samples: int = 0
    good_samples: int = 0  # samples that reached the model (bad_samples + good_samples = samples read)
    truncated_captions: int = 0
    unk_tokens: int = 0  # caption tokens unknown to the tokenizer, of word_tokens (non-special ones)
    word_tokens: int = 0
    unk_warned: bool = False
    bad_examples: list[str] = field(default_factory=list)  # a few paths for the error message
    logged_bad: set[str] = field(default_factory=set)
    samples_seen: int = 0
    # the logging window's optimizer steps: sum of pre-clip gradient norms, steps whose norm was clipped
    window_grad_norm: float = 0.0
    window_clipped: int = 0
    window_steps: int = 0


@dataclass
class TrainingJob:
    """What the loop needs besides the config: the module whose parameters are optimized, the objective
    that owns the step, the data, and how to save/load weights and evaluate."""

    module: nn.Module
    objective: Objective
    loader: DataLoader[Any]
    dataset: Any
    sampler: ResumableSampler | None
    save_weights: Callable[[Path], None]
    load_weights: Callable[[Path], None]
    evaluate: Callable[[int, bool], dict[str, float]] | None = None
