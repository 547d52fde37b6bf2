"""Depth order inside an encoder tower: layer ids for layer-wise lr decay and groups for partial locking.

Layer ids follow timm's ``param_groups_layer_decay`` on a timm ViT: the embedding stem is layer 0, block ``i``
is layer ``i + 1``, and whatever follows the blocks (final norm, the tower's own projection or pooling) joins
the last block (timm's ``MATCH_PREV_GROUP``), so ``max_layer = depth``. timm backbones (also inside open_clip)
use timm's own grouping (``group_parameters(model, model.group_matcher(coarse=False), reverse=True)``), exactly
as ``param_groups_layer_decay`` does.

Partial locking follows open_clip's ``lock(unlocked_groups)``: the groups are the layers above in depth order
(stem, each block, the last block with what follows it: open_clip's ViT and text-tower grouping), the last N
stay trainable; open_clip towers are locked by their own ``lock`` methods, timm towers by timm's groups (as
open_clip's ``TimmModel.lock``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from vlp.errors import ConfigError, UserError

__all__ = ["tower_layer_ids", "lock_tower"]

# (stem pattern, block pattern with the block index as group 1), matched against the tower's parameter names
_NATIVE_VIT = (r"^(patch_embed|cls_token|pos_embed)", r"^blocks\.(\d+)\.")
_NATIVE_TEXT = (r"^(embeddings|pos_embed|embed_norm)", r"^blocks\.(\d+)\.")
_OPEN_CLIP_VIT = (r"^visual\.(conv1|class_embedding|positional_embedding|ln_pre|patch_dropout)",
                  r"^visual\.transformer\.resblocks\.(\d+)\.")
_OPEN_CLIP_TEXT = (r"^text\.(token_embedding|positional_embedding|cls_emb)", r"^text\.transformer\.resblocks\.(\d+)\.")
_HF_TEXT = (r"^model\.embeddings\.", r"^model\.(?:encoder\.)?(?:layer|layers|block)\.(\d+)\.")
_RESNET = (r"^visual\.(conv|bn)\d", r"^visual\.layer(\d)\.")  # open_clip ModifiedResNet: layer1..layer4


def _by_rules(encoder: nn.Module, stem: str, blocks: str, block_offset: int = 1) -> tuple[dict[str, int], int]:
    stem_re, block_re = re.compile(stem), re.compile(blocks)
    found: dict[str, int] = {}
    for name, _ in encoder.named_parameters():
        match = block_re.match(name)
        if match:
            found[name] = int(match.group(1)) + block_offset
        elif stem_re.match(name):
            found[name] = 0
    top = max(found.values(), default=0)  # the final norm etc. join the last block
    return {name: found.get(name, top) for name, _ in encoder.named_parameters()}, top


def _timm_ids(model: nn.Module, prefix: str) -> tuple[dict[str, int], int]:
    """timm's own layer map, as ``param_groups_layer_decay`` builds it (unmatched parameters: the last layer)."""
    from timm.models import group_parameters
    from timm.optim._param_groups import auto_group_layers

    matcher: Callable[..., object] | None = getattr(model, "group_matcher", None)
    layer_map = (group_parameters(model, matcher(coarse=False), reverse=True) if callable(matcher)
                 else auto_group_layers(model))
    top = max(layer_map.values())
    return {f"{prefix}{name}": layer_map.get(name, top) for name, _ in model.named_parameters()}, top


def tower_layer_ids(encoder: nn.Module) -> tuple[dict[str, int], int]:
    """``({parameter name in the encoder: layer id}, max layer id)`` for a vlp image or text encoder."""
    from vlp.encoders.hf import HFTextEncoder
    from vlp.encoders.open_clip_encoder import OpenClipImageEncoder, OpenClipTextEncoder
    from vlp.encoders.text_transformer import TextTransformer
    from vlp.encoders.timm_encoder import TimmImageEncoder
    from vlp.encoders.vit import VisionTransformer

    if isinstance(encoder, VisionTransformer):
        return _by_rules(encoder, *_NATIVE_VIT)
    if isinstance(encoder, TextTransformer):
        return _by_rules(encoder, *_NATIVE_TEXT)
    if isinstance(encoder, TimmImageEncoder):
        return _timm_ids(encoder.model, "model.")
    if isinstance(encoder, OpenClipImageEncoder):
        if encoder.kind == "timm":
            ids, top = _timm_ids(encoder.visual.trunk, "visual.trunk.")
            top += 1  # open_clip's head (projection) after the trunk
            return {name: ids.get(name, top) for name, _ in encoder.named_parameters()}, top
        if encoder.kind == "resnet":
            return _by_rules(encoder, *_RESNET, block_offset=0)
        return _by_rules(encoder, *_OPEN_CLIP_VIT)
    if isinstance(encoder, OpenClipTextEncoder):
        return _by_rules(encoder, *_OPEN_CLIP_TEXT)
    if isinstance(encoder, HFTextEncoder):
        return _by_rules(encoder, *_HF_TEXT)
    raise UserError(f"layer-wise lr decay / partial locking: no layer order known for {type(encoder).__name__}")


def _lock_groups(encoder: nn.Module) -> list[list[nn.Parameter]]:
    """Parameter groups in depth order, open_clip's grouping (see the module docstring)."""
    ids, top = tower_layer_ids(encoder)
    named = dict(encoder.named_parameters())
    groups: list[list[nn.Parameter]] = [[] for _ in range(top + 1)]
    for name, layer in ids.items():
        groups[layer].append(named[name])
    return [group for group in groups if group]


def lock_tower(encoder: nn.Module, unlocked_groups: int, key: str) -> None:
    """Freeze ``encoder`` except its last ``unlocked_groups`` groups (0 = all of it); ``key`` names the config key.

    open_clip towers use their own ``lock`` (the text tower's always freezes its LayerNorms with the rest:
    open_clip supports nothing else)."""
    from vlp.encoders.open_clip_encoder import OpenClipImageEncoder, OpenClipTextEncoder

    if unlocked_groups < 0:
        raise ConfigError(f"config key '{key}' = {unlocked_groups}: must be >= 0")
    if isinstance(encoder, OpenClipImageEncoder):
        if encoder.kind == "resnet" and unlocked_groups:
            raise UserError(f"config key '{key}' = {unlocked_groups}: open_clip's ModifiedResNet tower can only be "
                            "locked whole")
        encoder.visual.lock(unlocked_groups=unlocked_groups)
        return
    if isinstance(encoder, OpenClipTextEncoder):
        encoder.text.lock(unlocked_groups, freeze_layer_norm=True)
        return
    encoder.requires_grad_(False)
    if unlocked_groups:
        for group in _lock_groups(encoder)[-unlocked_groups:]:
            for param in group:
                param.requires_grad_(True)
