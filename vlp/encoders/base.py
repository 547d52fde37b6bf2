"""Interfaces every image and text encoder implements, and the speed-only ability an encoder may declare.

``computes_pooled_only`` (a class attribute, False here): the encoder's ``forward`` takes ``pooled_only=True``
and then computes only what ``pooled`` depends on (e.g. the pooled row alone in its last block); ``tokens``
and ``mask`` may then be partial. The pooled output is the full forward's, so this is speed only. Callers
ask through ``encode(..., pooled_only=True)``, which passes it on only to encoders that declare it.
"""

from __future__ import annotations

from typing import ClassVar

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
    computes_pooled_only: ClassVar[bool] = False

    def forward(self, images: Tensor) -> EncoderOutput:  # pragma: no cover - interface
        raise TypeError(f"{type(self).__name__} must implement forward")

    def encode(self, images: Tensor, pooled_only: bool = False) -> EncoderOutput:
        """``self(images)``; ``pooled_only`` (only ``pooled`` is read) reaches encoders that declare
        ``computes_pooled_only``, the others compute everything."""
        if pooled_only and self.computes_pooled_only:
            out: EncoderOutput = self(images, pooled_only=True)
        else:
            out = self(images)
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:  # pragma: no cover - interface
        raise TypeError(f"{type(self).__name__} must implement set_grad_checkpointing")


class TextEncoder(nn.Module):
    """input_ids [B, T], attention_mask bool [B, T] -> EncoderOutput(tokens [B, T, width], mask, pooled [B, embed_dim])."""

    width: int
    embed_dim: int
    vocab_size: int
    bidirectional: bool
    computes_pooled_only: ClassVar[bool] = False

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> EncoderOutput:  # pragma: no cover - interface
        raise TypeError(f"{type(self).__name__} must implement forward")

    def encode(self, input_ids: Tensor, attention_mask: Tensor, pooled_only: bool = False) -> EncoderOutput:
        """As ``ImageEncoder.encode``: ``self(input_ids, attention_mask)``, with ``pooled_only`` where declared."""
        if pooled_only and self.computes_pooled_only:
            out: EncoderOutput = self(input_ids, attention_mask, pooled_only=True)
        else:
            out = self(input_ids, attention_mask)
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:  # pragma: no cover - interface
        raise TypeError(f"{type(self).__name__} must implement set_grad_checkpointing")
