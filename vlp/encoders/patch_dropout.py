"""Patch dropout (Li et al., 2023, "Scaling Language-Image Pre-training via Masking", FLIP) on an image tower.

In training a tower keeps a random ``max(1, int(L * (1 - prob)))`` of its L patch tokens per image, after
the position embeddings; class and other prefix tokens are always kept. In eval mode every patch is
seen. The modules are the towers' own libraries' (timm's ``PatchDropout`` for the native ViT and timm
models, open_clip's for open_clip ViT towers), so a tower behaves exactly as it would with its library's
``patch_drop_rate`` / ``patch_dropout`` option. They draw from the global torch RNG, which the
gradient-cache step replays (``vlp.objectives.gradcache.RngSnapshot``) and checkpoints save.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vlp.encoders.open_clip_encoder import OpenClipImageEncoder
from vlp.encoders.timm_encoder import TimmImageEncoder
from vlp.encoders.vit import VisionTransformer
from vlp.errors import ConfigError

__all__ = ["set_patch_dropout"]


def _timm_tower(model: Any, prob: float, what: str) -> None:
    """timm's own switch: ``patch_drop`` is a PatchDropout(WithIndices) when created with patch_drop_rate > 0,
    else Identity (ViT family) or None (EVA, NaFlexViT, whose forward then takes the kept indices)."""
    from timm.layers import PatchDropout, PatchDropoutWithIndices

    if not hasattr(model, "patch_drop"):
        if prob > 0:
            raise ConfigError(f"objective.patch_dropout {prob}: {what} has no patch dropout "
                              "(timm's patch_drop_rate); use a ViT-style tower")
        return
    current = model.patch_drop
    if hasattr(current, "prob"):
        current.prob = prob
    elif prob > 0:
        kind = PatchDropoutWithIndices if current is None else PatchDropout
        model.patch_drop = kind(prob, num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)))


def set_patch_dropout(encoder: nn.Module, prob: float) -> None:
    """Drop the fraction ``prob`` of ``encoder``'s patch tokens in training steps (0 = keep every patch).

    Native ViT, timm ViT-style models and open_clip ViT or timm-trunk towers; any other encoder may define
    its own ``set_patch_dropout(prob)``, and refuses ``prob > 0`` otherwise (one ConfigError line)."""
    if not 0 <= prob < 1:
        raise ConfigError(f"objective.patch_dropout {prob}: must be in [0, 1)")
    from timm.layers import PatchDropout

    if isinstance(encoder, VisionTransformer):
        encoder.patch_drop = PatchDropout(prob, num_prefix_tokens=1) if prob > 0 else nn.Identity()
    elif isinstance(encoder, TimmImageEncoder):
        _timm_tower(encoder.model, prob, f"timm model {type(encoder.model).__name__}")
    elif isinstance(encoder, OpenClipImageEncoder) and encoder.kind == "vit":
        from open_clip.transformer import PatchDropout as OpenClipPatchDropout

        encoder.visual.patch_dropout = OpenClipPatchDropout(prob) if prob > 0 else nn.Identity()
    elif isinstance(encoder, OpenClipImageEncoder) and encoder.kind == "timm":
        _timm_tower(encoder.visual.trunk, prob, f"the open_clip timm trunk {type(encoder.visual.trunk).__name__}")
    elif callable(getattr(encoder, "set_patch_dropout", None)):
        encoder.set_patch_dropout(prob)  # type: ignore[operator]
    elif prob > 0:
        raise ConfigError(f"objective.patch_dropout {prob}: the image encoder {type(encoder).__name__} has no "
                          "patch dropout (native vit, timm ViTs and open_clip ViT or timm towers have)")

