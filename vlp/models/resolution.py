"""Changing a model's input resolution: rebuild the image tower at a new ``image_size`` and carry its
weights over, with the absolute position embeddings interpolated to the new patch grid.

The interpolation is each tower library's own: ``timm.layers.resample_abs_pos_embed`` (bicubic,
antialiased) for the native ViT and timm towers, keeping the prefix tokens' positions as they are (1 class
token for the native ViT; timm's ``num_prefix_tokens``, i.e. class and register tokens, or 0 when the
model has none or does not embed them, as SigLIP); open_clip's ``resize_pos_embed`` for open_clip ViT
towers (1 class token). Converted checkpoints use these towers (SigLIP: a timm ViT without prefix
tokens), so they resize alike. open_clip towers on a timm trunk are built at the trunk's own size (open_clip
passes it none), and any other tensor whose shape depends on the input size (e.g. a Swin's
relative-position tables, a ResNet attention pool) cannot follow: each is one error line.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from torch import Tensor, nn

from vlp.encoders import build_image_encoder
from vlp.encoders.base import ImageEncoder
from vlp.encoders.open_clip_encoder import OpenClipImageEncoder
from vlp.encoders.timm_encoder import TimmImageEncoder, load_weights
from vlp.encoders.vit import VisionTransformer
from vlp.errors import UserError

__all__ = ["position_embeddings", "resample_image_state", "change_image_size"]

log = logging.getLogger("vlp")
# the options key that overrides image_size in a tower's library config (converted open_clip towers set it)
SIZE_OPTIONS = {"timm": "img_size", "open_clip": "image_size"}


def _timm_positions(model: Any, prefix: str) -> list[tuple[str, int, str]]:
    if not isinstance(getattr(model, "pos_embed", None), nn.Parameter):
        return []
    tokens = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
    return [(f"{prefix}pos_embed", tokens, "timm")]


def position_embeddings(encoder: nn.Module) -> list[tuple[str, int, str]]:
    """(state-dict key, prefix tokens, interpolation: timm | open_clip) of ``encoder``'s absolute position
    embeddings; empty for towers without them."""
    if isinstance(encoder, VisionTransformer):
        return [("pos_embed", 1, "timm")]
    if isinstance(encoder, TimmImageEncoder):
        return _timm_positions(encoder.model, "model.")
    if isinstance(encoder, OpenClipImageEncoder) and encoder.kind == "vit":
        return [("visual.positional_embedding", 1, "open_clip")]
    if isinstance(encoder, OpenClipImageEncoder) and encoder.kind == "timm":
        return _timm_positions(encoder.visual.trunk, "visual.trunk.")
    return []


def _side(tokens: int, prefix: int, key: str) -> int:
    side = math.isqrt(max(tokens - prefix, 0))
    if side * side != tokens - prefix:
        raise UserError(f"{key}: {tokens} positions with {prefix} prefix tokens are not a square patch grid")
    return side


def resample_image_state(state: dict[str, Tensor], encoder: nn.Module) -> tuple[dict[str, Tensor], list[str]]:
    """``state`` (an image tower's state dict at another resolution) fitted to ``encoder``: its position
    embeddings interpolated to ``encoder``'s grid. Returns the state and one description per resampled
    tensor; a remaining shape mismatch is one UserError line."""
    from open_clip.model import resize_pos_embed
    from timm.layers import resample_abs_pos_embed

    own = encoder.state_dict()
    state = dict(state)
    done: list[str] = []
    for key, prefix, kind in position_embeddings(encoder):
        if key not in state or key not in own or state[key].shape == own[key].shape:
            continue
        sequence = 0 if kind == "open_clip" else 1  # open_clip stores [n, d], timm and vlp [1, n, d]
        old = _side(state[key].shape[sequence], prefix, key)
        new = _side(own[key].shape[sequence], prefix, key)
        if kind == "open_clip":
            resized = {"visual.positional_embedding": state[key]}
            resize_pos_embed(resized, encoder)  # open_clip's own (it reads encoder.visual.grid_size)
            state[key] = resized["visual.positional_embedding"]
        else:
            state[key] = resample_abs_pos_embed(state[key], new_size=[new, new], old_size=[old, old],
                                                num_prefix_tokens=prefix)
        done.append(f"{key} resampled from a {old}x{old} to a {new}x{new} patch grid "
                    f"({prefix} prefix token{'s' * (prefix != 1)} kept)")
    wrong = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if wrong:
        raise UserError(f"cannot change the image size of {type(encoder).__name__}: these tensors depend on it and "
                        f"vlp resamples only absolute position embeddings: {', '.join(wrong[:4])}")
    return state, done


def _fixed_trunk_size(encoder: nn.Module) -> int | None:
    """The input size an open_clip timm trunk was built for (open_clip passes it no image size), else None."""
    if not (isinstance(encoder, OpenClipImageEncoder) and encoder.kind == "timm"):
        return None
    size = getattr(getattr(encoder.visual.trunk, "patch_embed", None), "img_size", None)
    return int(size[0]) if size is not None else None


def change_image_size(model: Any, image_size: int) -> str | None:
    """Rebuild ``model``'s (a VLPModel) image tower for ``image_size`` inputs in place, keeping its weights
    with the position embeddings interpolated, and update ``model.config``. Returns the one-line note it
    logs, or None when the size is already ``image_size``."""
    from vlp.config.validate import validate_model_config

    old_encoder: ImageEncoder = model.image_encoder
    if image_size == old_encoder.image_size:
        return None
    cfg = model.config.image
    options = dict(cfg.options)
    size_key = SIZE_OPTIONS.get(cfg.type)
    if size_key in options:
        options[size_key] = image_size
    image_cfg = dataclasses.replace(cfg, image_size=image_size, weights="", options=options)
    config = dataclasses.replace(model.config, image=image_cfg)
    validate_model_config(config)
    encoder = build_image_encoder(image_cfg)
    trunk_size = _fixed_trunk_size(encoder)
    if trunk_size is not None and trunk_size != image_size:
        raise UserError(f"cannot change the image size to {image_size}: open_clip builds its timm trunk "
                        f"'{cfg.options.get('timm_model_name')}' at that model's own {trunk_size} px; "
                        "name a timm model of the wanted size instead")
    state, done = resample_image_state(old_encoder.state_dict(), encoder)
    load_weights(encoder, state, f"the {old_encoder.image_size}-pixel image encoder")
    parameter = next(old_encoder.parameters(), None)
    if parameter is not None:
        encoder.to(device=parameter.device, dtype=parameter.dtype)
    model.image_encoder = encoder.train(old_encoder.training)
    model.config = config
    what = "; ".join(f"image_encoder.{line}" for line in done) or "no position embeddings to resample"
    note = f"image_size {old_encoder.image_size} -> {image_size}: {what}"
    log.info(note)
    return note
