"""Native Vision Transformer: conv patch embedding, CLS token, learned positions, pre-norm blocks, final norm.

Axis legend: b = batch, d = width, h/w = patch grid, n = tokens (CLS + patches).
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlp.config.schema import CLIP_MEAN, CLIP_STD, ImageEncoderConfig
from vlp.config.validate import conv_stem_fits_patch
from vlp.encoders.base import ImageEncoder
from vlp.errors import ConfigError
from vlp.layers import Rows, TransformerBlock
from vlp.registry import image_encoders
from vlp.types import EncoderOutput

__all__ = ["PATCH_EMBEDDINGS", "VisionTransformer", "build_vit", "patch_embedding"]


def init_transformer_weights(module: nn.Module) -> None:
    """ViT/BERT initialisation: truncated normal (std 0.02) linear and embedding weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


PATCH_EMBEDDINGS = ("patch", "conv_stem")


def patch_embedding(kind: str, patch_size: int, width: int) -> nn.Module:
    """images [b, 3, H, W] -> [b, width, H/p, W/p]: ViT's one strided convolution (``patch``), or a
    convolutional stem (``conv_stem``, Xiao et al. 2021): log2(p) 3x3 stride-2 convolutions whose channels
    double up to ``width``, BatchNorm + ReLU between them and none after the last (timm's ConvStem). The
    stem costs a few percent of a small ViT's step and lets it see shapes smaller than a patch."""
    if kind == "patch":
        return nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
    if kind != "conv_stem":
        raise ValueError(f"unknown patch embedding {kind!r}; choose from {', '.join(PATCH_EMBEDDINGS)}")
    if not conv_stem_fits_patch(patch_size) or width % (patch_size // 2):
        raise ValueError(f"conv_stem needs a power-of-2 patch_size >= 4 and a width divisible by patch_size / 2; "
                         f"got patch_size {patch_size}, width {width}")
    from timm.models.vision_transformer_hybrid import ConvStem

    depth = patch_size.bit_length() - 1
    channels = tuple(width >> (depth - 1 - i) for i in range(depth))
    return ConvStem(3, depth=depth, channels=channels, stride=(2,) * depth)


class VisionTransformer(ImageEncoder):
    """images [b, 3, H, W] -> tokens [b, 1 + (H/p)(W/p), width] (CLS first, after the final norm); pooled = CLS."""

    computes_pooled_only = True

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, dropout: float = 0.0,
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD, eps: float = 1e-6,
                 patch_embed: str = "patch") -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.width = self.embed_dim = width
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = patch_embedding(patch_embed, patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, width))
        self.drop = nn.Dropout(dropout)
        # FLIP patch dropout, off unless vlp.encoders.patch_dropout.set_patch_dropout turns it on for training
        self.patch_drop: nn.Module = nn.Identity()
        self.blocks = nn.ModuleList(
            TransformerBlock(width, num_heads, mlp_ratio=mlp_ratio, dropout=dropout, pre_norm=True, eps=eps)
            for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=eps)
        self.grad_checkpointing = False
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_transformer_weights)

    def forward(self, images: Tensor, pooled_only: bool = False) -> EncoderOutput:
        """``pooled_only``: the last block computes only the CLS row (a dual encoder's ITC reads nothing else);
        ``tokens`` then hold that row [b, 1, width]."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected images of {self.image_size}x{self.image_size}, got {list(images.shape)}")
        patches = rearrange(self.patch_embed(images), "b d h w -> b (h w) d")
        cls = repeat(self.cls_token, "1 1 d -> b 1 d", b=patches.shape[0])
        x = self.patch_drop(self.drop(torch.cat([cls, patches], dim=1) + self.pos_embed))
        for index, block in enumerate(self.blocks):
            rows = Rows.first() if pooled_only and index == len(self.blocks) - 1 else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, rows=rows, use_reentrant=False)
            else:
                x = block(x, rows=rows)
        tokens = self.norm(x)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(tokens=tokens, mask=mask, pooled=tokens[:, 0])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


@image_encoders.register("vit")
def build_vit(cfg: ImageEncoderConfig) -> VisionTransformer:
    if cfg.image_size % cfg.patch_size != 0:
        raise ConfigError(f"image.image_size {cfg.image_size} is not divisible by image.patch_size {cfg.patch_size}")
    if cfg.width % cfg.num_heads != 0:
        raise ConfigError(f"image.width {cfg.width} is not divisible by image.num_heads {cfg.num_heads}")
    if cfg.options:
        raise ConfigError(f"image.options {sorted(cfg.options)} are not used by the native vit encoder")
    try:
        encoder = VisionTransformer(cfg.image_size, cfg.patch_size, cfg.width, cfg.depth, cfg.num_heads,
                                    mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout, mean=cfg.mean, std=cfg.std,
                                    eps=cfg.layer_norm_eps, patch_embed=cfg.patch_embed)
    except ValueError as error:  # the size checks above leave only the patch embedding's
        raise ConfigError(f"image.patch_embed: {error}") from None
    if cfg.weights:
        from vlp.encoders.timm_encoder import load_weights, read_weights

        load_weights(encoder, read_weights(cfg.weights), cfg.weights)
    return encoder
