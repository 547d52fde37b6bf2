"""Single-stream fusion (ViLT): text and image tokens joined into one sequence of self-attention blocks.

Axis legend: b = batch, t = text tokens, i = image tokens, d = width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlp.fusion.base import LAYER_NORM_EPS, Fusion, as_bool_mask, check_fusion_inputs, transformer_blocks
from vlp.layers import Rows, TransformerBlock, init_cross_modal_weights
from vlp.types import FusionOutput

__all__ = ["SingleStreamFusion"]


class SingleStreamFusion(Fusion):
    """ViLT fusion: modality-type embeddings (text 0, image 1) are added, the two token sequences are
    concatenated and run through pre-norm self-attention blocks, then a final LayerNorm.

    ``pooled`` = tanh(Linear(text [CLS] state)) as ViLT's pooler; ``out_dim`` = ``dim``. Declares
    ``computes_pooled_only``; no shared image context (the image tokens change in every block).
    """

    computes_pooled_only = True

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 init: str = "xavier") -> None:
        super().__init__()
        self.dim = self.image_dim = dim
        self.out_dim = dim
        self.modality_type = nn.Embedding(2, dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, mlp_ratio, dropout, pre_norm=True, eps=LAYER_NORM_EPS)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.pooler = nn.Linear(dim, dim)
        init_cross_modal_weights(self, init)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for block in transformer_blocks(self.blocks):
            block.grad_checkpointing = enable

    def forward(self, text: Tensor, image: Tensor, text_mask: Tensor | None = None, image_mask: Tensor | None = None,
                return_attention: bool = False, pooled_only: bool = False) -> FusionOutput:
        """text [b, t, d], image [b, i, d], masks bool [b, t], [b, i] (True = real; None = all real).

        ``pooled_only``: the last block computes only the text [CLS] row that ``pooled`` reads (ITM scoring);
        ``text`` then holds that row [b, 1, d] and ``image`` is empty [b, 0, d].
        """
        check_fusion_inputs(self.dim, text, image, text_mask, image_mask)
        text_mask, image_mask = as_bool_mask(text_mask), as_bool_mask(image_mask)
        num_text = text.shape[1]
        tokens = torch.cat([text + self.modality_type.weight[0], image + self.modality_type.weight[1]], dim=1)
        mask = None
        if text_mask is not None or image_mask is not None:
            # One side unmasked still needs explicit True entries in the joint [b, t + i] mask.
            text_real = text_mask if text_mask is not None else text.new_ones(text.shape[:2], dtype=torch.bool)
            image_real = image_mask if image_mask is not None else image.new_ones(image.shape[:2], dtype=torch.bool)
            mask = torch.cat([text_real, image_real], dim=1)

        attentions: list[dict[str, Tensor]] = []
        blocks = transformer_blocks(self.blocks)
        for index, block in enumerate(blocks):
            rows = Rows.first() if pooled_only and index == len(blocks) - 1 else None
            tokens, weights = block.forward_with_weights(tokens, mask, return_weights=return_attention, rows=rows)
            if return_attention:
                attentions.append({"self": weights["self"]})
        tokens = self.norm(tokens)
        text_out, image_out = tokens[:, :num_text], tokens[:, num_text:]
        pooled = torch.tanh(self.pooler(text_out[:, 0]))
        return FusionOutput(text=text_out, image=image_out, pooled=pooled,
                            attentions=attentions if return_attention else None)
