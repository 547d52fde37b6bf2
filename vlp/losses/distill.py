"""Distillation: ALBEF's momentum soft targets and feature queue, and a frozen teacher's ITC logits as soft
targets (open_clip's DistillClipLoss).

The objective owns when these run (queue updates after the optimizer step); here is only the math
and the queue's storage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.collectives import gather_no_grad, gather_with_grad

__all__ = ["soft_targets", "soft_cross_entropy", "FeatureQueue", "teacher_distill_loss"]


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


def teacher_distill_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, teacher_image: Tensor,
                         teacher_text: Tensor, teacher_scale: Tensor | float, local_loss: bool = False) -> Tensor:
    """The distill term of open_clip's ``DistillClipLoss``: the student's ITC logits (both directions) scored
    by cross entropy against the softmax of the teacher's logits over the same pairs, each logit matrix with
    its own model's scale, averaged over the two directions. fp32; the teacher side carries no gradient.

    Embeddings [B, E] (student) and [B, E_t] (teacher; widths may differ) are L2-normalized here. In a
    process group both are gathered as ``contrastive_loss`` gathers (the student with gradient), and with
    ``local_loss`` a rank scores its own rows against all columns, as open_clip does.
    """
    with torch.autocast(device_type=image_emb.device.type, enabled=False):
        image, text = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
        t_image = F.normalize(teacher_image.detach().float(), dim=-1)
        t_text = F.normalize(teacher_text.detach().float(), dim=-1)
        all_image, all_text = gather_with_grad(image), gather_with_grad(text)
        t_all_image, t_all_text = gather_no_grad(t_image), gather_no_grad(t_text)
        rows = (image, text, t_image, t_text) if local_loss else (all_image, all_text, t_all_image, t_all_text)
        scale = logit_scale.float() if isinstance(logit_scale, Tensor) else float(logit_scale)
        t_scale = teacher_scale.detach().float() if isinstance(teacher_scale, Tensor) else float(teacher_scale)
        teacher_i2t = F.softmax(t_scale * rows[2] @ t_all_text.T, dim=1)
        teacher_t2i = F.softmax(t_scale * rows[3] @ t_all_image.T, dim=1)
        return (soft_cross_entropy(scale * rows[0] @ all_text.T, teacher_i2t)
                + soft_cross_entropy(scale * rows[1] @ all_image.T, teacher_t2i)) / 2


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
