"""VLPModel and its factory."""

from vlp.models.factory import build_model, model_config_from
from vlp.models.vlp_model import ImageContext, VLPModel

__all__ = ["VLPModel", "ImageContext", "build_model", "model_config_from"]
