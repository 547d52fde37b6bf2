"""The fusion interface: what every fusion block has, and the speed-only abilities a block declares.

A fusion block maps text tokens [b, t, dim] and image tokens [b, i, image_dim] (bool masks, True = real) to a
``FusionOutput``. Two speed-only abilities (the same outputs for less work) are declared on the block, never
found by inspecting ``forward``'s signature:

- ``computes_pooled_only`` (class attribute): ``forward(..., pooled_only=True)`` computes only what
  ``pooled`` reads in the last layer (its ``text``/``image`` may then be partial);
- ``shares_image_context()`` (may depend on how the block was built): the image states never change, so
  ``image_kv(image)`` precomputes every layer's cross-attention keys/values, and ``forward(..., image_kv=...,
  image_index=...)`` reuses them and lets several text rows share one image by index.

``VLPModel`` asks only blocks that declare an ability; a fusion module that is not a ``Fusion`` (a
user-registered ``nn.Module``) is run in full.
"""

from __future__ import annotations

from typing import ClassVar, TypeGuard, cast

from torch import Tensor, nn

from vlp.layers import TransformerBlock
from vlp.types import FusionOutput

__all__ = ["Fusion", "computes_pooled_only", "shares_image_context", "check_fusion_inputs", "transformer_blocks",
           "as_bool_mask", "LAYER_NORM_EPS"]

# HF's ViltLayer / BertLayer LayerNorm epsilon; kept so converted checkpoints give the same outputs.
LAYER_NORM_EPS = 1e-12


class Fusion(nn.Module):
    """Base of the fusion blocks; ``dim`` = text width, ``image_dim`` = image token width, ``out_dim`` =
    width of ``pooled``."""

    dim: int
    image_dim: int
    out_dim: int
    computes_pooled_only: ClassVar[bool] = False

    def shares_image_context(self) -> bool:
        """Whether ``image_kv`` and ``forward(..., image_kv=..., image_index=...)`` are offered."""
        return False

    def image_kv(self, image: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Each layer's cross-attention keys and values [b, h, i, d] for image tokens [b, i, image_dim]."""
        raise ValueError(f"{type(self).__name__} does not share image keys/values (shares_image_context() is "
                         "False): its image states change in every layer, or it has no cross-attention")

    def forward(self, text: Tensor, image: Tensor, text_mask: Tensor | None = None,
                image_mask: Tensor | None = None, return_attention: bool = False) -> FusionOutput:  # pragma: no cover
        raise TypeError(f"{type(self).__name__} must implement forward")

    def set_grad_checkpointing(self, enable: bool = True) -> None:  # pragma: no cover - interface
        raise TypeError(f"{type(self).__name__} must implement set_grad_checkpointing")


def computes_pooled_only(fusion: nn.Module) -> TypeGuard[Fusion]:
    """Whether ``fusion`` declares ``pooled_only`` (a ``Fusion`` with ``computes_pooled_only``)."""
    return isinstance(fusion, Fusion) and fusion.computes_pooled_only


def shares_image_context(fusion: nn.Module) -> TypeGuard[Fusion]:
    """Whether ``fusion`` declares shared image keys/values (a ``Fusion`` whose ``shares_image_context()``
    is True)."""
    return isinstance(fusion, Fusion) and fusion.shares_image_context()


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
