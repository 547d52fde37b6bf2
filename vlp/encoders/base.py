"""Interfaces every image and text encoder implements."""

from __future__ import annotations

from torch import Tensor, nn

from vlp.types import EncoderOutput

__all__ = ["ImageEncoder", "TextEncoder"]


class ImageEncoder(nn.Module):
    """images [B, 3, H, W] (normalized with ``mean``/``std``) -> EncoderOutput(tokens [B, N, width], mask, pooled [B, embed_dim])."""

    width: int
    embed_dim: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def forward(self, images: Tensor) -> EncoderOutput:  # pragma: no cover - interface
        raise TypeError(f"{type(self).__name__} must implement forward")

    def set_grad_checkpointing(self, enable: bool = True) -> None:  # pragma: no cover - interface
        raise TypeError(f"{type(self).__name__} must implement set_grad_checkpointing")


class TextEncoder(nn.Module):
    """input_ids [B, T], attention_mask bool [B, T] -> EncoderOutput(tokens [B, T, width], mask, pooled [B, embed_dim])."""

    width: int
    embed_dim: int
    vocab_size: int
    bidirectional: bool

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> EncoderOutput:  # pragma: no cover - interface
        raise TypeError(f"{type(self).__name__} must implement forward")

    def set_grad_checkpointing(self, enable: bool = True) -> None:  # pragma: no cover - interface
        raise TypeError(f"{type(self).__name__} must implement set_grad_checkpointing")
