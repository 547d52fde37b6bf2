"""Trainer checkpoints: saving and restoring everything an exact resume needs (optimizer and schedule,
data position, fault counters, every rank's RNG streams); the files themselves are vlp.train.checkpoint's."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlp.collectives import gather_objects
from vlp.config.schema import Config
from vlp.train import checkpoint as ckpt
from vlp.train import faults
from vlp.train.distributed import (
    DistInfo,
    full_state_dicts,
    load_optimizer_state,
    optimizer_state,
    restore_rank_rng,
    resume_position,
)
from vlp.train.seeding import rng_state
from vlp.train.state import TrainingJob, TrainState

if TYPE_CHECKING:
    from vlp.train.ema import WeightEMA

__all__ = ["TrainerSaver", "restore_trainer"]

log = logging.getLogger("vlp")


class TrainerSaver:
    """Writes the run's checkpoints: weights and the whole trainer state, atomically, every rank's RNG streams."""


    def __init__(self, config: Config, root: Path, job: TrainingJob, optimizer: torch.optim.Optimizer,
                 scheduler: Any, state: TrainState, dist: DistInfo, ema: WeightEMA | None = None) -> None:
        self.config, self.root, self.job, self.optimizer = config, root, job, optimizer
        self.scheduler, self.state, self.dist, self.ema = scheduler, state, dist, ema

    def save(self) -> Path:
        """An atomic checkpoint with everything needed to resume exactly."""
        state = self.state
        target = self.root / f"step_{state.step}"
        # collectives first (every rank's RNG streams; FSDP's full weights and optimizer state), then rank 0 writes
        rngs = gather_objects(rng_state())
        ema = self.ema.state_dict() if self.ema is not None else None  # full tensors: a collective under FSDP
        with full_state_dicts(self.job.objective):
            optimizer = optimizer_state(self.job.objective, self.optimizer)
            if self.dist.rank == 0:
                def write(directory: Path) -> None:
                    self.job.save_weights(directory)
                    if self.ema is not None:
                        self.ema.save(directory, ema)
                    ckpt.save_trainer_state(directory / "trainer_state.pt", {
                        "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                        "step": state.step, "epoch": state.epoch, "batches_in_epoch": state.batches_in_epoch,
                        "samples_seen": state.samples_seen, "rng": rngs[0], "rng_ranks": rngs,
                        "world_size": self.dist.world_size, "batch_size": self.config.data.batch_size,
                        **faults.fault_state(state),
                    })

                ckpt.write_atomic(target, write)
                ckpt.prune_checkpoints(self.root, self.config.train.keep_last)
        if self.dist.world_size > 1:
            torch.distributed.barrier()
        return target


def restore_trainer(directory: Path, optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState,
                     objective: nn.Module, dist: DistInfo, config: Config) -> None:
    """Load a checkpoint's optimizer, schedule, position, fault counters and RNG streams for an exact resume."""
    trainer = ckpt.load_trainer_state(directory / "trainer_state.pt")
    if not load_optimizer_state(objective, optimizer, trainer["optimizer"]):
        log.warning("%s: optimizer state was saved with the other train.fsdp setting; fresh AdamW moments", directory)
    scheduler.load_state_dict(trainer["scheduler"])
    state.step, state.epoch = int(trainer["step"]), int(trainer["epoch"])
    state.batches_in_epoch = resume_position(trainer, dist.world_size, config.data.batch_size)
    state.samples_seen = int(trainer.get("samples_seen", 0))
    faults.restore_fault_state(state, trainer)
    restore_rank_rng(trainer, dist.rank, dist.world_size, config.train.seed)
    log.info("resumed from %s at step %d", directory, state.step)
