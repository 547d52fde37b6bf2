"""Explanations: Grad-CAM maps of where a caption grounds in an image, overlays, and a localization check."""

from vlp.explain.gradcam import Explanation, caption_heatmap, explain, text_to_image_gradcam
from vlp.explain.localization import box_ratio, localization_ratio, object_caption
from vlp.explain.overlay import explanation_summary, overlay_figure, save_overlay

__all__ = ["Explanation", "explain", "text_to_image_gradcam", "caption_heatmap", "save_overlay", "overlay_figure",
           "explanation_summary",
           "localization_ratio", "object_caption", "box_ratio"]
