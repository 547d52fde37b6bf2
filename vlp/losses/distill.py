"""ALBEF momentum distillation: soft targets from the momentum model and the feature queue.

The objective owns when these run (queue updates after the optimizer step); here is only the math
and the queue's storage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["soft_targets", "soft_cross_entropy", "FeatureQueue"]


def soft_targets(sim_momentum: Tensor, alpha: float, hard_targets: Tensor) -> Tensor:
    """alpha * softmax(sim_momentum) + (1 - alpha) * hard_targets, rows over N candidates, fp32.

    sim_momentum [B, N]: the momentum model's similarities, already divided by the temperature
    (ALBEF: ``image_feat_m @ text_feat_all / temp``); hard_targets [B, N]: rows summing to 1.
    """
    with torch.autocast(device_type=sim_momentum.device.type, enabled=False):
        momentum = F.softmax(sim_momentum.detach().float(), dim=1)
        return alpha * momentum + (1 - alpha) * hard_targets.float()


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """-(log_softmax(logits) * targets).sum(1).mean(), in fp32."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return -(F.log_softmax(logits.float(), dim=1) * targets.float()).sum(dim=1).mean()


class FeatureQueue(nn.Module):
    """A ring buffer of past (momentum) image and text features and their image ids.

    Buffers (saved with the objective's state): ``image_queue`` and ``text_queue`` [dim, size]
    (column-major as ALBEF, so ``feat @ queue`` scores against every entry), ``idx_queue`` long
    [size] (-100 = no image yet: never equal to a real id), ``ptr`` long [1], the next slot.
    Starts with random unit features, as ALBEF does.
    """

    image_queue: Tensor
    text_queue: Tensor
    idx_queue: Tensor
    ptr: Tensor

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        if dim <= 0 or size <= 0:
            raise ValueError(f"FeatureQueue needs positive dim and size, got dim={dim}, size={size}")
        self.size = size
        self.register_buffer("image_queue", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("idx_queue", torch.full((size,), -100, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, image_feat: Tensor, text_feat: Tensor, image_ids: Tensor) -> None:
        """Write [N, dim] features (already gathered across ranks) and ids [N] over the oldest entries.

        Wraps around the end; when N exceeds the queue only the newest ``size`` entries are kept.
        """
        if image_feat.shape != text_feat.shape or image_feat.shape[0] != image_ids.shape[0]:
            raise ValueError(
                f"enqueue: image {tuple(image_feat.shape)}, text {tuple(text_feat.shape)} and ids"
                f" {tuple(image_ids.shape)} must share the batch size and width"
            )
        count = image_feat.shape[0]
        start = int(self.ptr.item())
        if count > self.size:
            start = (start + count - self.size) % self.size
            image_feat, text_feat, image_ids = image_feat[-self.size :], text_feat[-self.size :], image_ids[-self.size :]
            count = self.size
        first = min(count, self.size - start)
        for queue, values in ((self.image_queue, image_feat), (self.text_queue, text_feat)):
            values = values.detach().to(queue.dtype)
            queue[:, start : start + first] = values[:first].T
            queue[:, : count - first] = values[first:].T
        self.idx_queue[start : start + first] = image_ids[:first]
        self.idx_queue[: count - first] = image_ids[first:]
        self.ptr.fill_((start + count) % self.size)

    def features(self) -> tuple[Tensor, Tensor, Tensor]:
        """(image [size, dim], text [size, dim], ids [size]): detached copies of the queue."""
        rows = torch.contiguous_format
        return (
            self.image_queue.T.clone(memory_format=rows),
            self.text_queue.T.clone(memory_format=rows),
            self.idx_queue.clone(),
        )
