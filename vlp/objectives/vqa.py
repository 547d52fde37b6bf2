"""The VQA fine-tuning objective: the soft-target loss of a ``VQAModel``'s answer logits."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from torch import Tensor, nn

from vlp.losses import vqa_loss
from vlp.objectives.base import Objective
from vlp.types import LossOutput

__all__ = ["VQAObjective"]


class VQAObjective(Objective):
    """``forward(batch)``: ``vqa_model``'s logits on images/questions against ``batch["targets"]``."""

    def __init__(self, vqa_model: nn.Module, autocast: Callable[[], AbstractContextManager[Any]] | None = None) -> None:
        super().__init__(autocast)
        self.vqa_model = vqa_model

    def forward(self, batch: dict[str, Tensor]) -> LossOutput:
        logits = self.vqa_model(batch["images"], batch["input_ids"], batch["attention_mask"])
        loss = vqa_loss(logits, batch["targets"])
        return LossOutput(loss, {"vqa": loss.detach()})
