"""Image and text encoders: native (vit, transformer), timm, open_clip and Hugging Face, behind two builders.

Importing this package registers every encoder in ``vlp.registry.image_encoders`` / ``text_encoders``.
"""

from __future__ import annotations

from vlp.config.schema import ImageEncoderConfig, TextEncoderConfig
from vlp.data.tokenizers import Tokenizer
from vlp.encoders import hf, open_clip_encoder, text_transformer, timm_encoder, vit
from vlp.encoders.base import ImageEncoder, TextEncoder
from vlp.errors import ConfigError
from vlp.registry import image_encoders, text_encoders

__all__ = ["ImageEncoder", "TextEncoder", "build_image_encoder", "build_text_encoder"]

_REGISTERED = (hf, open_clip_encoder, text_transformer, timm_encoder, vit)


def build_image_encoder(cfg: ImageEncoderConfig) -> ImageEncoder:
    """The image encoder ``cfg.type`` names, built from ``cfg``."""
    try:
        builder = image_encoders.get(cfg.type)
    except KeyError as error:
        raise ConfigError(f"image.type: {error.args[0]}") from error
    encoder: ImageEncoder = builder(cfg)
    return encoder


def build_text_encoder(cfg: TextEncoderConfig, tokenizer: Tokenizer) -> TextEncoder:
    """The text encoder ``cfg.type`` names, built from ``cfg`` for ``tokenizer``'s ids."""
    try:
        builder = text_encoders.get(cfg.type)
    except KeyError as error:
        raise ConfigError(f"text.type: {error.args[0]}") from error
    encoder: TextEncoder = builder(cfg, tokenizer)
    return encoder
