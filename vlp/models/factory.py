"""Factories: the only code that reads model configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from torch import nn

from vlp.config.io import _read_yaml, from_dict, load_model_dict
from vlp.config.schema import ModelConfig
from vlp.config.validate import validate_model_config
from vlp.errors import ConfigError
from vlp.layers.logit_scale import LogitScale
from vlp.models.vlp_model import VLPModel
from vlp.registry import fusions, image_encoders, text_encoders

__all__ = ["build_model", "build_temperature", "model_config_from"]


def model_config_from(source: str | Path | dict[str, Any] | ModelConfig) -> ModelConfig:
    """A ModelConfig from a preset path/name, a full run YAML (its ``model:`` section), a dict, or itself."""
    if isinstance(source, ModelConfig):
        return source
    if isinstance(source, dict):
        data = source
        base = Path.cwd()
    else:
        path = Path(source)
        if not path.is_file():
            data, base = load_model_dict(str(source), Path.cwd()), Path.cwd()
        else:
            data, base = _read_yaml(path), path.parent
    if "model" in data and isinstance(data["model"], (dict, str)) and not {"image", "text"} & set(data):
        data = data["model"] if isinstance(data["model"], dict) else load_model_dict(data["model"], base)
    config = from_dict(ModelConfig, data, prefix="model")
    validate_model_config(config)
    return config


def build_temperature(config: ModelConfig) -> LogitScale:
    """The logit scale (and, for SigLIP, the bias) the model owns, so checkpoints carry them
    (state-dict keys ``temperature.log_scale``, ``temperature.bias``)."""
    return LogitScale(temperature=config.temperature, temperature_min=config.temperature_min,
                      temperature_max=config.temperature_max, learnable=config.learn_temperature,
                      bias=config.siglip_bias if config.contrastive == "siglip" else None)


def _share_text_layers(text_encoder: nn.Module, fusion: nn.Module | None) -> None:
    """fusion.share_text_layers (BLIP): one BERT stack is the text tower (text only) and the fusion (with the image)."""
    from vlp.encoders.text_transformer import TextTransformer
    from vlp.fusion import DualStreamFusion

    if (not isinstance(text_encoder, TextTransformer) or not isinstance(fusion, DualStreamFusion)
            or fusion.update_image or len(text_encoder.blocks) or text_encoder.causal):
        raise ConfigError("model.fusion.share_text_layers needs a bidirectional text.type 'transformer' with "
                          "text.depth 0 and a one-way fusion (type dual_stream, update_image false)")
    text_encoder.share_fusion_layers(fusion.text_layers)


def build_model(config: ModelConfig, tokenizer: Any = None) -> VLPModel:
    """Build tokenizer, encoders, fusion and heads from a model config."""
    import vlp.encoders  # noqa: F401  (registers encoders)
    import vlp.fusion  # noqa: F401  (registers fusion blocks)
    from vlp.data.tokenizers import build_tokenizer

    try:
        tokenizer = tokenizer if tokenizer is not None else build_tokenizer(config.text)
        image_encoder = image_encoders.get(config.image.type)(config.image)
        text_encoder = text_encoders.get(config.text.type)(config.text, tokenizer)
        fusion = fusions.get(config.fusion.type)(config.fusion, text_encoder.width)
        if config.fusion.share_text_layers:
            _share_text_layers(text_encoder, fusion)
    except KeyError as exc:
        raise ConfigError(str(exc.args[0]) if exc.args else str(exc)) from None
    if hasattr(tokenizer, "model_max_length"):  # tokenizer(texts) then needs no max_length
        tokenizer.model_max_length = config.text.max_length
    return VLPModel(
        image_encoder,
        text_encoder,
        fusion,
        temperature=build_temperature(config),
        embed_dim=config.embed_dim,
        itm_head=config.itm_head,
        mlm_head=config.mlm_head,
        tokenizer=tokenizer,
        config=config,
    )


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)
