"""Configs: frozen dataclasses mirrored by YAML."""

from vlp.config.io import apply_overrides, from_dict, load_config, save_config, to_dict
from vlp.config.schema import (
    Config,
    DataConfig,
    EvalConfig,
    FusionConfig,
    ImageEncoderConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    ScheduleConfig,
    TextEncoderConfig,
    TrainConfig,
    VQAConfig,
)

__all__ = [
    "Config", "ModelConfig", "ImageEncoderConfig", "TextEncoderConfig", "FusionConfig", "ObjectiveConfig",
    "DataConfig", "OptimConfig", "ScheduleConfig", "TrainConfig", "EvalConfig", "VQAConfig",
    "load_config", "from_dict", "to_dict", "save_config", "apply_overrides",
]
