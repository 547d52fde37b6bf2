"""VQAModel: a fused VLP model with the VQA classifier on its pooled fusion output (ViLT/METER)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vlp.errors import UserError
from vlp.models.heads import VQAHead

__all__ = ["VQAModel", "HEAD_INPUTS"]

HEAD_INPUTS = ("fused", "fused+image")


class VQAModel(nn.Module):
    """A fused VLP model with a VQA head on the fusion's pooled output (width ``model.fusion.out_dim``).

    ``head_input`` "fused+image" concatenates the image tower's pooled [CLS] to it (as METER's head reads
    both streams' poolers): what the contrastive pretraining put in the image embedding (how many objects,
    which ones) reaches the head even while the fusion's cross-attention has not learned to carry it.
    """

    def __init__(self, model: Any, num_answers: int, hidden_mult: int = 2, in_dim: int | None = None,
                 head_input: str = "fused") -> None:
        super().__init__()
        if not model.has_fusion:
            raise UserError(f"{type(model).__name__} has no fusion block: VQA needs a fused model "
                            "(model.fusion.type other than none)")
        if head_input not in HEAD_INPUTS:
            raise UserError(f"vqa.head_input: unknown value '{head_input}'; known: {', '.join(HEAD_INPUTS)}")
        self.model = model
        self.head_input = head_input
        width = int(model.fusion.out_dim) + (int(model.image_encoder.embed_dim) if head_input == "fused+image" else 0)
        self.head = VQAHead(in_dim or width, num_answers, hidden_mult)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Answer logits [B, num_answers] (fp32)."""
        image_out, _ = self.model.image_features(images)
        text_out, _ = self.model.text_features(input_ids, attention_mask)
        pooled = self.model.fuse(text_out, image_out, pooled_only=True).pooled
        if self.head_input == "fused+image":
            pooled = torch.cat([pooled, image_out.pooled.to(pooled.dtype)], dim=-1)
        return self.head(pooled).float()  # type: ignore[no-any-return]
