"""Image transforms (train: random resized crop; eval: resize + center crop, as open_clip) and RGB loading."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

__all__ = ["train_transform", "eval_transform", "to_rgb", "open_image", "ImageTransform"]

ImageTransform = Callable[[Image.Image], Tensor]

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}  # "I" is how Pillow opens 16-bit grayscale PNGs


def _to_tensor(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                    crop_scale: Sequence[float] = (0.5, 1.0), hflip: bool = False) -> v2.Compose:
    """RandomResizedCrop (bicubic) -> optional horizontal flip -> float tensor -> Normalize.

    The flip is off by default because captions name left and right.
    """
    crop = v2.RandomResizedCrop(image_size, scale=(crop_scale[0], crop_scale[1]),
                                interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    steps: list[v2.Transform] = [crop]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _to_tensor(mean, std))


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Resize the shorter side (bicubic) -> CenterCrop -> float tensor -> Normalize (as open_clip's eval)."""
    steps: list[v2.Transform] = [
        v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
    ]
    return v2.Compose(steps + _to_tensor(mean, std))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: 16-bit is rescaled (not clipped), transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0  # float images are usually in [0, 1]
        return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La")
    if has_alpha or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def open_image(source: str | Path | bytes) -> Image.Image:
    """Decode a file path or encoded bytes fully (so truncation surfaces here) and convert to RGB.

    Raises OSError/ValueError/SyntaxError from Pillow on missing, truncated or non-image input.
    """
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()
        return to_rgb(image)
