"""Single-stream fusion (ViLT): text and image tokens joined into one sequence of self-attention blocks.

Axis legend: b = batch, t = text tokens, i = image tokens, d = width.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from vlp.layers import TransformerBlock, init_cross_modal_weights
from vlp.types import FusionOutput

__all__ = ["SingleStreamFusion"]

# HF's ViltLayer / BertLayer LayerNorm epsilon; kept so converted checkpoints give the same outputs.
LAYER_NORM_EPS = 1e-12


def check_fusion_inputs(dim: int, text: Tensor, image: Tensor, text_mask: Tensor | None,
                        image_mask: Tensor | None, image_dim: int | None = None,
                        image_index: Tensor | None = None) -> None:
    """Shapes a fusion block accepts: text [b, t, dim], image [b, i, image_dim or dim], masks [b, t] and [b, i];
    with ``image_index`` [b], image [g, i, ...] holds g distinct images indexed by it."""
    if text.dim() != 3 or image.dim() != 3:
        raise ValueError(f"fusion expects text [B,T,D] and image [B,I,D]; got {tuple(text.shape)} and {tuple(image.shape)}")
    if text.shape[-1] != dim or image.shape[-1] != (image_dim or dim):
        widths = f"width is {dim}" if (image_dim or dim) == dim else f"widths are text {dim}, image {image_dim}"
        raise ValueError(f"fusion {widths}; got text width {text.shape[-1]} and image width {image.shape[-1]} "
                         "(project image tokens to the fusion width first)")
    if image_index is not None:
        if image_index.shape != (text.shape[0],):
            raise ValueError(f"image_index has shape {tuple(image_index.shape)}; expected ({text.shape[0]},)")
        if len(image_index) and not 0 <= int(image_index.min()) <= int(image_index.max()) < image.shape[0]:
            raise ValueError(f"image_index values must be in [0, {image.shape[0]})")
    elif text.shape[0] != image.shape[0]:
        raise ValueError(f"text batch {text.shape[0]} != image batch {image.shape[0]}")
    for name, mask, tokens in (("text_mask", text_mask, text), ("image_mask", image_mask, image)):
        if mask is not None and tuple(mask.shape) != tuple(tokens.shape[:2]):
            raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected {tuple(tokens.shape[:2])}")


def transformer_blocks(layers: nn.ModuleList) -> list[TransformerBlock]:
    """The blocks of a ModuleList, typed (iterating a ModuleList yields plain ``nn.Module``)."""
    return [cast(TransformerBlock, layer) for layer in layers]


def as_bool_mask(mask: Tensor | None) -> Tensor | None:
    """Long/int masks (1 = real) as bool; None stays None (all real)."""
    return None if mask is None else mask.bool()


class SingleStreamFusion(nn.Module):
    """ViLT fusion: modality-type embeddings (text 0, image 1) are added, the two token sequences are
    concatenated and run through pre-norm self-attention blocks, then a final LayerNorm.

    ``pooled`` = tanh(Linear(text [CLS] state)) as ViLT's pooler; ``out_dim`` = ``dim``.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 init: str = "xavier") -> None:
        super().__init__()
        self.dim = dim
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
            tokens, weights = block.forward_with_weights(tokens, mask, return_weights=return_attention,
                                                         first_only=pooled_only and index == len(blocks) - 1)
            if return_attention:
                attentions.append({"self": weights["self"]})
        tokens = self.norm(tokens)
        text_out, image_out = tokens[:, :num_text], tokens[:, num_text:]
        pooled = torch.tanh(self.pooler(text_out[:, 0]))
        return FusionOutput(text=text_out, image=image_out, pooled=pooled,
                            attentions=attentions if return_attention else None)
