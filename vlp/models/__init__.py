"""VLPModel and its factory."""

from vlp.models.factory import build_model, model_config_from
from vlp.models.heads import VQAHead
from vlp.models.vlp_model import ImageContext, VLPModel, VLPOutput
from vlp.models.vqa_model import VQAModel

__all__ = ["VLPModel", "VLPOutput", "ImageContext", "VQAModel", "VQAHead", "build_model", "model_config_from"]
