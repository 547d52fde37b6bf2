"""Any timm backbone as an image encoder, plus the strict local-weights loading the encoders share.

``timm.create_model(cfg.name, pretrained=False, num_classes=0, img_size=cfg.image_size, **cfg.options)``:
architecture kwargs (``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``drop_path_rate``, ...)
go in ``options``; ``img_size`` is left out for backbones that do not take it (CNNs). Weights come
only from ``cfg.weights``, a local file, passed through the model's own timm ``checkpoint_filter_fn``
(which converts known formats and resamples position embeddings to ``image_size``); classifier-head
tensors are dropped, everything else must match exactly.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from vlp.config.schema import ImageEncoderConfig
from vlp.encoders.base import ImageEncoder
from vlp.errors import ConfigError, UserError, one_line, some
from vlp.registry import image_encoders
from vlp.types import EncoderOutput

__all__ = ["TimmImageEncoder", "build_timm", "read_weights", "load_weights", "feature_tokens"]

RESERVED_OPTIONS = ("pretrained", "num_classes", "pretrained_cfg_overlay")


def read_weights(path: str) -> dict[str, Tensor]:
    """A state dict from a local .safetensors / .pt / .pth / .bin file (training-checkpoint wrappers unwrapped)."""
    from timm.models import load_state_dict

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"weights file '{path}' does not exist (vlp only loads local files, it never downloads)")
    try:
        state = load_state_dict(str(file), device="cpu", weights_only=True)
    except Exception as error:  # safetensors, pickle and zip readers each raise their own types
        found = re.search(r"Unsupported globals?: ([\w.]+?)\.?(?:\s|$)|GLOBAL ([\w.]+)", str(error))
        if found:  # the library's advice to retry with weights_only=False would run the file's code
            raise UserError(f"refused weights file {path}: it holds a pickled object ({found.group(1) or found.group(2)}), "
                            "not only tensors; vlp never unpickles code (use a .safetensors file)") from error
        if "weights_only" in str(error):
            raise UserError(f"cannot read weights file {path}: corrupt, or not loadable with "
                            "torch.load(weights_only=True)") from error
        raise UserError(f"cannot read weights file {path}: {one_line(error)}") from error
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"weights file {path} does not hold a state dict of tensors")
    return dict(state)


def load_weights(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``module`` strictly; any mismatch is one UserError line naming the tensors."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    problems = [f"{label}: {some(names)}" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs model)", wrong)) if names]
    if problems:
        raise UserError(f"weights {source} do not match {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def feature_tokens(features: Tensor, channels_last: bool = False) -> Tensor:
    """Backbone features as tokens [b, n, d]: a 4-D feature map is flattened row-major, tokens pass through."""
    if features.ndim != 4:
        return features
    return rearrange(features, "b h w d -> b (h w) d" if channels_last else "b d h w -> b (h w) d")


class TimmImageEncoder(ImageEncoder):
    """A timm model: tokens = ``forward_features`` (prefix/CLS tokens first where the model has them; a 4-D map
    is flattened row-major), pooled = ``forward_head(pre_logits=True)``."""

    model: Any  # a timm model; typed loosely as timm's model classes are untyped

    def __init__(self, model: nn.Module, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.width = int(self.model.num_features)
        self.embed_dim = int(getattr(self.model, "head_hidden_size", self.width))
        self.image_size = image_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.channels_last_features = str(getattr(model, "output_fmt", "NCHW")).endswith("NHWC")

    def forward(self, images: Tensor) -> EncoderOutput:
        features = self.model.forward_features(images)
        pooled = self.model.forward_head(features, pre_logits=True)
        tokens = feature_tokens(features, self.channels_last_features)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(tokens=tokens, mask=mask, pooled=pooled)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


def _timm_state(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Apply the architecture's own checkpoint converter, then drop classifier tensors (num_classes=0)."""
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if callable(filter_fn):
        state = filter_fn(state, model)
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    own = model.state_dict()
    return {k: v for k, v in state.items() if k in own or not any(k.startswith(f"{h}.") for h in heads)}


def _create(name: str, kwargs: dict[str, Any], explicit_img_size: bool) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as error:
        # CNN backbones take any input size and reject img_size; other bad kwargs are the user's.
        if "img_size" in str(error) and not explicit_img_size:
            return _create(name, {k: v for k, v in kwargs.items() if k != "img_size"}, True)
        raise ConfigError(f"image.options for timm model '{name}': {one_line(error)}") from error


@image_encoders.register("timm")
def build_timm(cfg: ImageEncoderConfig) -> TimmImageEncoder:
    import timm

    if not cfg.name:
        raise ConfigError("image.name is empty: the timm encoder needs a model name, e.g. vit_base_patch16_224")
    if not timm.is_model(cfg.name):
        close = difflib.get_close_matches(cfg.name, timm.list_models(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"image.name '{cfg.name}' is not a timm model{hint}")
    for key in RESERVED_OPTIONS:
        if key in cfg.options:
            raise ConfigError(f"image.options.{key} is not allowed: vlp sets it (weights come from image.weights)")
    kwargs = {"img_size": cfg.image_size, **cfg.options}
    model = _create(cfg.name, kwargs, explicit_img_size="img_size" in cfg.options)
    if cfg.weights:
        try:
            state = _timm_state(model, read_weights(cfg.weights))
        except (RuntimeError, ValueError, KeyError) as error:
            raise UserError(f"cannot convert weights {cfg.weights} for {cfg.name}: {one_line(error)}") from error
        load_weights(model, state, cfg.weights)
    return TimmImageEncoder(model, cfg.image_size, cfg.mean, cfg.std)
