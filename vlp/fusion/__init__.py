"""Fusion blocks that join text and image tokens, and their registry builders.

Registered in ``vlp.registry.fusions`` as ``builder(cfg: FusionConfig, dim: int) -> nn.Module | None``:
``none`` (dual encoder, returns None), ``single_stream`` (ViLT), ``dual_stream`` (ALBEF one-way when
``cfg.update_image`` is False, METER co-attention when True). Both blocks are ``Fusion`` subclasses, which
declare their speed-only abilities (``vlp.fusion.base``).
"""

from __future__ import annotations

from torch import nn

from vlp.config.schema import FusionConfig
from vlp.errors import ConfigError
from vlp.fusion.base import Fusion
from vlp.fusion.dual_stream import DualStreamFusion
from vlp.fusion.none import build_no_fusion
from vlp.fusion.single_stream import SingleStreamFusion
from vlp.registry import fusions

__all__ = ["Fusion", "SingleStreamFusion", "DualStreamFusion", "build_fusion"]


def _check_shape(cfg: FusionConfig, dim: int) -> None:
    if cfg.depth <= 0:
        raise ConfigError(f"config key 'model.fusion.depth' = {cfg.depth!r}: must be positive")
    if cfg.num_heads <= 0 or dim % cfg.num_heads != 0:
        raise ConfigError(f"config key 'model.fusion.num_heads' = {cfg.num_heads!r}: "
                          f"fusion width {dim} is not divisible by it")


@fusions.register("single_stream")
def build_single_stream(cfg: FusionConfig, dim: int) -> SingleStreamFusion:
    _check_shape(cfg, dim)
    return SingleStreamFusion(dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.dropout, init=cfg.init)


@fusions.register("dual_stream")
def build_dual_stream(cfg: FusionConfig, dim: int) -> DualStreamFusion:
    _check_shape(cfg, dim)
    if cfg.image_width and cfg.update_image:
        raise ConfigError("config key 'model.fusion.image_width' needs model.fusion.update_image: false")
    return DualStreamFusion(dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.dropout, update_image=cfg.update_image,
                            init=cfg.init,
                            image_dim=cfg.image_width or None)


fusions.register("none")(build_no_fusion)


def build_fusion(cfg: FusionConfig, dim: int) -> nn.Module | None:
    """The fusion block named by ``cfg.type`` at width ``dim``; None for ``none``."""
    try:
        builder = fusions.get(cfg.type)
    except KeyError as err:  # the registry's message lists the known names and the closest one
        raise ConfigError(f"config key 'model.fusion.type': {err.args[0]}") from None
    module: nn.Module | None = builder(cfg, dim)
    return module
