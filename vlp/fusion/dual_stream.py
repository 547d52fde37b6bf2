"""Dual-stream fusion: BERT-style layers with cross-attention, one-way (ALBEF) or co-attention (METER).

Axis legend: b = batch, t = text tokens, i = image tokens, h = heads, d = head width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlp.fusion.base import LAYER_NORM_EPS, Fusion, as_bool_mask, check_fusion_inputs, transformer_blocks
from vlp.layers import Attention, Rows, SharedContext, TransformerBlock, init_cross_modal_weights
from vlp.types import FusionOutput

__all__ = ["DualStreamFusion"]


def _cross_attention(layer: TransformerBlock) -> Attention:
    if layer.cross_attn is None:
        raise TypeError("dual-stream layers are built with cross-attention")
    return layer.cross_attn


class DualStreamFusion(Fusion):
    """Post-norm BERT layers: self-attention, cross-attention to the other stream, FFN.

    ``update_image=True`` (METER co-attention): both streams have layers, and each layer's cross-attention
    reads the other stream's previous-layer states; ``pooled`` concatenates tanh poolers on the text and
    image [CLS] states, ``out_dim`` = 2 * ``dim``.
    ``update_image=False`` (ALBEF): only the text stream has layers, cross-attending to the fixed image
    tokens, which are returned unchanged; ``pooled`` = the text [CLS] state, ``out_dim`` = ``dim``.
    ``image_dim`` (one-way only): the image tokens' width when it differs from ``dim``; the cross-attention
    keys and values then project from it directly, as BLIP's (vision 1024, text 768 in its large models).
    Declares ``computes_pooled_only``, and ``shares_image_context()`` in the one-way form only.
    """

    computes_pooled_only = True

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 update_image: bool = True, image_dim: int | None = None, init: str = "xavier") -> None:
        super().__init__()
        if image_dim and update_image:
            raise ValueError("image_dim needs update_image=False: co-attention layers exchange states of one width")
        self.dim = dim
        self.image_dim = image_dim or dim
        self.update_image = update_image
        self.out_dim = 2 * dim if update_image else dim

        def layers(count: int, context_dim: int | None = None) -> nn.ModuleList:
            return nn.ModuleList(
                TransformerBlock(dim, num_heads, mlp_ratio, dropout, pre_norm=False, cross_attention=True,
                                 context_dim=context_dim, eps=LAYER_NORM_EPS)
                for _ in range(count)
            )

        self.text_layers = layers(depth, image_dim)
        self.image_layers = layers(depth if update_image else 0)
        self.text_pooler = nn.Linear(dim, dim) if update_image else None
        self.image_pooler = nn.Linear(dim, dim) if update_image else None
        init_cross_modal_weights(self, init)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for layer in transformer_blocks(self.text_layers) + transformer_blocks(self.image_layers):
            layer.grad_checkpointing = enable

    def shares_image_context(self) -> bool:
        """One-way only: co-attention changes the image states in every layer."""
        return not self.update_image

    def image_kv(self, image: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Each text layer's cross-attention keys and values [b, h, i, d] for image tokens [b, i, dim].

        Computed once per image, they are passed as ``forward(image_kv=...)``, with ``image_index`` naming each
        text row's image.
        """
        if not self.shares_image_context():
            raise ValueError("image_kv needs DualStreamFusion(update_image=False): co-attention changes the "
                             "image states in every layer")
        return [_cross_attention(layer).key_value(image) for layer in transformer_blocks(self.text_layers)]

    def forward(self, text: Tensor, image: Tensor, text_mask: Tensor | None = None, image_mask: Tensor | None = None,
                return_attention: bool = False, image_kv: list[tuple[Tensor, Tensor]] | None = None,
                pooled_only: bool = False, image_index: Tensor | None = None) -> FusionOutput:
        """text [b, t, dim], image [b, i, dim], masks bool [b, t], [b, i] (True = real; None = all real).

        ``image_kv``: ``self.image_kv(image)`` computed earlier (one-way form only), used instead of
        recomputing the image keys and values in every layer.
        ``image_index`` [b] (one-way form only): ``image`` (and ``image_mask``, ``image_kv``) hold g distinct
        images [g, i, dim] and text row b is paired with image ``image_index[b]``; each image's keys/values
        are projected once and shared by its rows, never copied per row. ``image`` is returned as given.
        ``pooled_only``: the last layer computes only the [CLS] rows that ``pooled`` reads (ITM scoring);
        ``text`` (and, with co-attention, ``image``) then hold that one row [b, 1, dim].
        """
        check_fusion_inputs(self.dim, text, image, text_mask, image_mask, self.image_dim, image_index)
        text_mask, image_mask = as_bool_mask(text_mask), as_bool_mask(image_mask)
        if (image_kv is not None or image_index is not None) and not self.shares_image_context():
            raise ValueError("image_kv and image_index need DualStreamFusion(update_image=False): co-attention "
                             "changes the image states in every layer")
        if image_kv is not None:
            self._check_image_kv(image_kv, image.shape[0], image.shape[1])
        if self.update_image:
            return self._co_attention(text, image, text_mask, image_mask, return_attention, pooled_only)

        attentions: list[dict[str, Tensor]] = []
        layers = transformer_blocks(self.text_layers)
        for index, layer in enumerate(layers):
            shared = None
            if image_kv is not None or image_index is not None:
                shared = SharedContext(kv=None if image_kv is None else image_kv[index], index=image_index)
            rows = Rows.first() if pooled_only and index == len(layers) - 1 else None
            text, weights = layer.forward_with_weights(text, text_mask, context=image, context_mask=image_mask,
                                                       return_weights=return_attention, rows=rows, shared=shared)
            if return_attention:
                attentions.append({"text_self": weights["self"], "text_to_image": weights["cross"]})
        return FusionOutput(text=text, image=image, pooled=text[:, 0],
                            attentions=attentions if return_attention else None)

    def _check_image_kv(self, image_kv: list[tuple[Tensor, Tensor]], num_images: int, num_tokens: int) -> None:
        if len(image_kv) != len(self.text_layers):
            raise ValueError(f"image_kv has {len(image_kv)} entries; the block has {len(self.text_layers)} layers")
        keys = image_kv[0][0] if image_kv else None
        if keys is not None and (keys.shape[0] != num_images or keys.shape[2] != num_tokens):
            raise ValueError(f"image_kv keys have shape {tuple(keys.shape)}; expected {num_images} images and "
                             f"{num_tokens} image tokens")

    def _co_attention(self, text: Tensor, image: Tensor, text_mask: Tensor | None, image_mask: Tensor | None,
                      return_attention: bool, pooled_only: bool) -> FusionOutput:
        attentions: list[dict[str, Tensor]] = []
        pairs = list(zip(transformer_blocks(self.text_layers), transformer_blocks(self.image_layers)))
        for index, (text_layer, image_layer) in enumerate(pairs):
            # Both streams read the other's states from the previous layer, as in METER.
            rows = Rows.first() if pooled_only and index == len(pairs) - 1 else None
            new_text, text_weights = text_layer.forward_with_weights(
                text, text_mask, context=image, context_mask=image_mask, return_weights=return_attention, rows=rows)
            new_image, image_weights = image_layer.forward_with_weights(
                image, image_mask, context=text, context_mask=text_mask, return_weights=return_attention, rows=rows)
            text, image = new_text, new_image
            if return_attention:
                attentions.append({
                    "text_self": text_weights["self"], "text_to_image": text_weights["cross"],
                    "image_self": image_weights["self"], "image_to_text": image_weights["cross"],
                })
        if self.text_pooler is None or self.image_pooler is None:
            raise TypeError("co-attention fusion is built with poolers")
        pooled = torch.cat([torch.tanh(self.text_pooler(text[:, 0])), torch.tanh(self.image_pooler(image[:, 0]))],
                           dim=-1)
        return FusionOutput(text=text, image=image, pooled=pooled,
                            attentions=attentions if return_attention else None)
