"""ViLT's VQA loss over the soft answer targets (``vlp.eval.vqa.AnswerVocab.targets``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["vqa_loss"]


def vqa_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """BCE-with-logits against the soft targets, averaged over batch and answers and then multiplied by the
    number of answers, i.e. summed over answers and averaged over the batch."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]
