"""VLPModel and its factory."""

from vlp.models.factory import build_model, model_config_from
from vlp.models.vlp_model import ImageContext, VLPModel, VLPOutput

__all__ = ["VLPModel", "VLPOutput", "ImageContext", "build_model", "model_config_from"]
