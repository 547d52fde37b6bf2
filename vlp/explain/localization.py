"""How well the explanation maps localize: heat inside an object's box relative to the box's area.

On the synthetic test scenes every object's pixel box is known. For each object, a caption naming only
that object is explained; the fraction of the caption map's mass inside the box, divided by the box's
share of the image area, is 1 for a uniform map and above 1 when the heat concentrates on the object.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.data.synthetic import SceneObject, SyntheticScenes
from vlp.errors import UserError
from vlp.explain.gradcam import caption_heatmap, text_to_image_gradcam
from vlp.models.vlp_model import VLPModel

__all__ = ["localization_ratio", "object_caption", "box_ratio"]


def object_caption(obj: SceneObject, with_position: bool = True) -> str:
    """A caption naming one object in the synthetic captions' words: "a small red circle on the left"."""
    return f"{obj.noun} {obj.position_phrase}" if with_position else obj.noun


def box_ratio(heatmap: Tensor, box: tuple[int, int, int, int], image_size: int) -> float:
    """(heat mass inside ``box``) / (box area / image area) for a map [y, x] stretched over a square image
    of ``image_size`` px; a map with no heat scores 0 (it localizes nothing).

    Each patch's heat is spread evenly over its pixels (nearest upsampling), which conserves mass when
    the grid divides the image side.
    """
    total = float(heatmap.sum())
    if total <= 0:
        return 0.0
    pixels = F.interpolate(heatmap[None, None].double(), size=(image_size, image_size), mode="nearest")[0, 0]
    x0, y0, x1, y1 = box
    inside = float(pixels[y0:y1, x0:x1].sum()) / float(pixels.sum())
    area = (x1 - x0) * (y1 - y0) / image_size**2
    return inside / area


def localization_ratio(model: VLPModel, scenes: SyntheticScenes, n_images: int = 200, layer: int | None = None,
                       with_position: bool = True, batch_size: int = 64) -> float:
    """The mean ``box_ratio`` over every object of the first ``n_images`` scenes, each explained with
    ``object_caption(obj, with_position)`` (the caption map of ``explain``, at fusion ``layer``)."""
    if len(scenes) == 0 or n_images <= 0:
        raise UserError("localization_ratio needs at least one synthetic scene")
    transform = model.image_transform(train=False)
    pairs = [(index, obj) for index in range(min(n_images, len(scenes))) for obj in scenes.objects(index)]
    device = model.device()
    ratios: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        images = torch.stack([transform(scenes.render(index)) for index, _ in chunk]).to(device)
        batch = model.tokenizer([object_caption(obj, with_position) for _, obj in chunk],
                                model.config.text.max_length)
        input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        maps, _ = text_to_image_gradcam(model, images, input_ids, mask, layer)
        heatmaps = caption_heatmap(maps, mask).cpu()
        ratios += [box_ratio(heat, obj.box, scenes.image_size) for heat, (_, obj) in zip(heatmaps, chunk)]
    return sum(ratios) / len(ratios)
