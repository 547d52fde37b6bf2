"""No fusion: a dual encoder (CLIP, SigLIP) whose image and text meet only in the contrastive loss."""

from __future__ import annotations

from vlp.config.schema import FusionConfig

__all__ = ["build_no_fusion"]


def build_no_fusion(cfg: FusionConfig, dim: int) -> None:
    """The ``none`` fusion builder: there is no block, so models skip ITM/MLM heads and fusion passes."""
    return None
