"""The explanation as a figure: the image with the caption's heatmap on top, plus one small map per word."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from vlp.explain.gradcam import Explanation

__all__ = ["save_overlay", "model_view"]

_WORD_COLUMNS = 6


def model_view(image: Image.Image, image_size: int) -> Image.Image:
    """The part of ``image`` the model saw: shorter side resized to ``image_size``, then center-cropped
    (the geometry of the evaluation transform, without normalization)."""
    steps = v2.Compose([v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                        v2.CenterCrop(image_size)])
    view: Image.Image = steps(image.convert("RGB"))
    return view


def _draw(axes: Any, view: Image.Image, heat: Tensor, vmax: float, title: str, fontsize: float) -> None:
    side = view.size[0]
    axes.imshow(view, extent=(0, side, side, 0))
    # The patch grid is stretched over the image; bilinear smoothing as in ALBEF's overlays.
    axes.imshow(heat.numpy(), cmap="jet", alpha=0.5, interpolation="bilinear", extent=(0, side, side, 0),
                vmin=0.0, vmax=vmax)
    axes.set_title(title, fontsize=fontsize)
    axes.set_axis_off()


def _scale(maps: Tensor) -> float:
    peak = float(maps.max()) if maps.numel() else 0.0
    return peak if peak > 0 else 1.0


def save_overlay(image: Image.Image, explanation: Explanation, out_png: str | Path, words: bool = True) -> Path:
    """Write a PNG: the model's view of ``image`` with the caption heatmap, and (``words``) a grid of
    per-word maps on one shared color scale, so words the model does not ground stay dark."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    view = model_view(image, explanation.image_size)
    word_maps = explanation.word_maps if words else explanation.word_maps[:0]
    rows = math.ceil(len(word_maps) / _WORD_COLUMNS)
    big = 4.0  # inches of the main panel
    small = big * 2 / _WORD_COLUMNS
    width = big + (small * _WORD_COLUMNS + 0.4 if rows else 0)
    figure = Figure(figsize=(width, max(big + 0.6, rows * (small + 0.35))), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(max(rows, 1), 1 + (_WORD_COLUMNS if rows else 0),
                               width_ratios=[_WORD_COLUMNS / 2] + [1] * (_WORD_COLUMNS if rows else 0))
    title = (textwrap.fill(explanation.text, 48)
             + f"\nITM match {explanation.itm_score:.2f} (fusion layer {explanation.layer})")
    _draw(figure.add_subplot(grid[:, 0]), view, explanation.heatmap, _scale(explanation.heatmap), title, 9)
    vmax = _scale(word_maps)
    for k, (word, heat) in enumerate(zip(explanation.words, word_maps)):
        _draw(figure.add_subplot(grid[k // _WORD_COLUMNS, 1 + k % _WORD_COLUMNS]), view, heat, vmax, word, 8)
    figure.tight_layout()
    path = Path(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
