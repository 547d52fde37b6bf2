"""Layer-wise learning-rate decay per tower (``optim.image_layer_decay``, ``optim.text_layer_decay``).

A parameter of layer ``l`` of a tower whose last layer is ``max_layer`` (vlp.train.tower_layers) is trained at
``lr x decay ** (max_layer - l)``, BEiT's rule as timm's ``param_groups_layer_decay`` applies it; vlp's
projections, the fusion, the heads and the temperature keep the full lr. The weight-decay groups of
vlp.train.optim are split further by scale: each group carries ``lr_scale`` and a ``group_name`` such as
``image/layer_3/decay``; the schedule multiplies every group's own peak lr.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from vlp.config.schema import OptimConfig

__all__ = ["parameter_scales", "split_by_layer", "full_lr_index", "decay_record"]

log = logging.getLogger("vlp")


def parameter_scales(model: nn.Module, image_decay: float, text_decay: float) -> dict[str, tuple[str, int, float]]:
    """``{parameter name: (tower, layer id, lr scale)}`` for the parameters of the towers that decay."""
    from vlp.encoders.base import ImageEncoder, TextEncoder
    from vlp.train.tower_layers import tower_layer_ids

    scales: dict[str, tuple[str, int, float]] = {}
    for prefix, module in model.named_modules():
        tower, decay = (("image", image_decay) if isinstance(module, ImageEncoder) else
                        ("text", text_decay) if isinstance(module, TextEncoder) else ("", 1.0))
        if not tower or decay == 1.0:
            continue
        ids, top = tower_layer_ids(module)
        for name, layer in ids.items():
            scales.setdefault(f"{prefix}.{name}" if prefix else name, (tower, layer, decay ** (top - layer)))
    return scales


def split_by_layer(model: nn.Module, groups: list[dict[str, Any]], image_decay: float,
                   text_decay: float) -> list[dict[str, Any]]:
    """The weight-decay ``groups`` (with ``param_names``) split by tower layer; groups keep their order, the
    full-lr parameters first within each."""
    scales = parameter_scales(model, image_decay, text_decay)
    out: list[dict[str, Any]] = []
    for group in groups:
        kind = "decay" if group["weight_decay"] > 0 else "no_decay"
        parts: dict[tuple[str, int], dict[str, Any]] = {}
        for name, param in zip(group["param_names"], group["params"]):
            tower, layer, scale = scales.get(name, ("", 0, 1.0))
            part = parts.setdefault((tower, layer), {
                "params": [], "param_names": [], "weight_decay": group["weight_decay"], "lr_scale": scale,
                "group_name": f"{tower}/layer_{layer}/{kind}" if tower else kind})
            part["params"].append(param)
            part["param_names"].append(name)
        out.extend(parts[key] for key in sorted(parts))
    return out


def full_lr_index(optimizer: torch.optim.Optimizer) -> int:
    """The first parameter group trained at the full base lr (the one the logged ``lr`` follows): scale 1
    when a group has it (a cross-modal multiplier above 1 is not the base), else the largest scale."""
    scales = [float(group.get("lr_scale", 1.0)) for group in optimizer.param_groups]
    return scales.index(1.0) if 1.0 in scales else scales.index(max(scales))


def decay_record(cfg: OptimConfig, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The decays and every group's peak lr (``lr_peak/<group name>``) for the run's first metrics record,
    also logged; empty without layer decay."""
    if cfg.image_layer_decay == 1.0 and cfg.text_layer_decay == 1.0 and cfg.fusion_lr_scale == 1.0:
        return {}
    peaks = {f"lr_peak/{group.get('group_name', index)}": float(group.get("initial_lr", group["lr"]))
             for index, group in enumerate(optimizer.param_groups)}
    log.info("layer-wise lr decay: image %g, text %g; cross-modal lr x%g; peak lr per group: %s",
             cfg.image_layer_decay, cfg.text_layer_decay, cfg.fusion_lr_scale, ", ".join(f"{k[8:]} {v:.3g}" for k, v in peaks.items()))
    return {"image_layer_decay": cfg.image_layer_decay, "text_layer_decay": cfg.text_layer_decay,
            "fusion_lr_scale": cfg.fusion_lr_scale, **peaks}
