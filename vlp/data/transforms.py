"""Image transforms (train: random resized crop; eval: resize + center crop, as open_clip) and RGB loading.

Both transforms first turn their input into 8-bit RGB: a Pillow image of any mode (RGBA, LA, P, L, I;16,
F, CMYK, ...) or a numpy array (H x W or H x W x C with C = 1, 3 or 4; uint8, uint16, bool or float).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from vlp.errors import UserError

__all__ = ["train_transform", "eval_transform", "to_rgb", "array_to_rgb", "open_image", "ImageTransform", "RGBInput"]

ImageTransform = Callable[[Image.Image], Tensor]

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}  # "I" is how Pillow opens 16-bit grayscale PNGs


def _to_tensor(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


class RGBInput:
    """The first step of every vlp image transform: Pillow images and numpy arrays become 8-bit RGB images
    (tensors pass through unchanged), so the model always gets three channels."""

    def __call__(self, image: Image.Image | np.ndarray | Tensor) -> Image.Image | Tensor:
        if isinstance(image, Image.Image):
            return to_rgb(image)
        if isinstance(image, np.ndarray):
            return array_to_rgb(image)
        return image

    def __repr__(self) -> str:
        return "RGBInput()"


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                    crop_scale: Sequence[float] = (0.5, 1.0), hflip: bool = False) -> v2.Compose:
    """RandomResizedCrop (bicubic) -> optional horizontal flip -> float tensor -> Normalize.

    The flip is off by default because captions name left and right.
    """
    crop = v2.RandomResizedCrop(image_size, scale=(crop_scale[0], crop_scale[1]),
                                interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    steps: list[Callable[..., object]] = [RGBInput(), crop]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _to_tensor(mean, std))


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Resize the shorter side (bicubic) -> CenterCrop -> float tensor -> Normalize (as open_clip's eval)."""
    steps: list[Callable[..., object]] = [
        RGBInput(),
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


def _to_uint8(values: np.ndarray) -> np.ndarray:
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    if np.issubdtype(values.dtype, np.floating):
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size == 0 or finite.max() <= 1.0 else 1.0  # float images are usually in [0, 1]
        return np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
    if values.dtype == np.uint16:
        return np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    if np.issubdtype(values.dtype, np.integer):
        return np.clip(values, 0, 255).astype(np.uint8)
    raise UserError(f"cannot read an image array of dtype {values.dtype}")


def array_to_rgb(array: np.ndarray) -> Image.Image:
    """A numpy image -> 8-bit RGB: H x W (gray) or H x W x C with C = 1, 3 or 4 (alpha composited on white);
    a C x H x W array (C = 1, 3 or 4 first) is read as channels-first. float values in [0, 1] are scaled
    by 255 (others are taken as 0..255), uint16 is rescaled."""
    values = np.asarray(array)
    if values.ndim == 3 and values.shape[-1] not in (1, 3, 4) and values.shape[0] in (1, 3, 4):
        values = np.moveaxis(values, 0, -1)
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim not in (2, 3) or (values.ndim == 3 and values.shape[-1] not in (3, 4)) or 0 in values.shape:
        raise UserError(f"expected an image array of shape HxW or HxWxC (C = 1, 3 or 4), got {values.shape}")
    pixels = np.ascontiguousarray(_to_uint8(values))
    return to_rgb(Image.fromarray(pixels))  # uint8 H x W / x3 / x4 -> L / RGB / RGBA


def open_image(source: str | Path | bytes) -> Image.Image:
    """Decode a file path or encoded bytes fully (so truncation surfaces here) and convert to RGB.

    Raises OSError/ValueError/SyntaxError from Pillow on missing, truncated or non-image input.
    """
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()
        return to_rgb(image)
