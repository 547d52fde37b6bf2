"""The objective interface the trainer drives: it owns forward + backward of a micro-batch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from torch import Tensor, nn

from vlp.types import LossOutput

__all__ = ["Objective"]


class Objective(nn.Module):
    """Subclasses implement ``forward(batch) -> LossOutput``; ``training_step`` runs it (through ``engine``,
    a DistributedDataParallel wrapper in multi-process runs) under autocast and backpropagates."""

    def __init__(self, autocast: Callable[[], AbstractContextManager[Any]] | None = None) -> None:
        super().__init__()
        self.autocast = autocast or contextlib.nullcontext
        # kept out of the module tree: a DDP wrapper of this module must not become its own child
        object.__setattr__(self, "_engine", None)

    @property
    def engine(self) -> nn.Module:
        engine: nn.Module | None = self.__dict__["_engine"]
        return self if engine is None else engine

    def set_engine(self, engine: nn.Module) -> None:
        object.__setattr__(self, "_engine", engine)

    def training_step(self, batch: dict[str, Tensor], scale: float = 1.0) -> LossOutput:
        """Forward and backward of one micro-batch; ``scale`` (1/accumulation) multiplies the gradient."""
        with self.autocast():
            out: LossOutput = self.engine(batch)
        (out.total * scale).backward()
        self.after_backward()
        return LossOutput(out.total.detach(), {k: v.detach() for k, v in out.terms.items()})

    def after_backward(self) -> None:
        """Hook run after every micro-batch's backward (e.g. a feature-queue update)."""

    def after_optimizer_step(self) -> None:
        """Hook run after every optimizer step (e.g. the momentum-encoder EMA)."""

    def extra_state_dict(self) -> dict[str, Tensor]:
        """State that is not model weights but must survive a resume (momentum encoder, queue)."""
        return {}

    def load_extra_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise KeyError(f"unexpected objective state: {sorted(state)[:5]}")
