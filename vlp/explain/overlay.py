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

__all__ = ["save_overlay", "overlay_figure", "model_view", "all_zero", "explanation_summary"]

_WORD_COLUMNS = 6


def model_view(image: Image.Image, image_size: int) -> Image.Image:
    """The part of ``image`` the model saw: shorter side resized to ``image_size``, then center-cropped
    (the geometry of the evaluation transform, without normalization)."""
    steps = v2.Compose([v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                        v2.CenterCrop(image_size)])
    view: Image.Image = steps(image.convert("RGB"))
    return view


def _draw(axes: Any, view: Image.Image, heat: Tensor, vmax: float, title: str, fontsize: float) -> Any:
    side = view.size[0]
    axes.imshow(view, extent=(0, side, side, 0))
    # The patch grid is stretched over the image; bilinear smoothing as in ALBEF's overlays.
    shown = axes.imshow(heat.numpy(), cmap="jet", alpha=0.5, interpolation="bilinear", extent=(0, side, side, 0),
                        vmin=0.0, vmax=vmax)
    axes.set_title(title, fontsize=fontsize)
    axes.set_axis_off()
    return shown


def _scale(maps: Tensor) -> float:
    peak = float(maps.max()) if maps.numel() else 0.0
    return peak if peak > 0 else 1.0


def all_zero(heat: Tensor) -> bool:
    """True when a map has no positive value: Grad-CAM found no gradient-weighted attention to show (an
    undertrained ITM head, or a layer whose attention does not reach the match score)."""
    return not bool((heat > 0).any())


ZERO_NOTE = "all zero: no image region raises the match score"


def explanation_summary(explanation: Explanation) -> dict[str, Any]:
    """The explanation's numbers as JSON-ready data: ITM score, layer, and the peak of each map with
    ``all_zero`` flags (and a ``note`` when the caption's map is all zero, so a blank picture is not misread)."""
    summary: dict[str, Any] = {
        "text": explanation.text, "itm_score": explanation.itm_score, "layer": explanation.layer,
        "heatmap_max": float(explanation.heatmap.max()), "all_zero": all_zero(explanation.heatmap),
        "words": [{"word": word, "max": float(heat.max()), "all_zero": all_zero(heat)}
                  for word, heat in zip(explanation.words, explanation.word_maps)],
    }
    if summary["all_zero"]:
        summary["note"] = f"the caption's map is {ZERO_NOTE} (often an undertrained model)"
    return summary


def overlay_figure(image: Image.Image, explanation: Explanation, words: bool = True) -> Any:
    """The figure ``save_overlay`` writes (a matplotlib ``Figure``): the caption's map with its colour bar and
    the per-word maps with one shared colour bar; a map that is all zero says so in its title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    view = model_view(image, explanation.image_size)
    word_maps = explanation.word_maps if words else explanation.word_maps[:0]
    rows = math.ceil(len(word_maps) / _WORD_COLUMNS)
    big = 4.0  # inches of the main panel
    small = big * 2 / _WORD_COLUMNS
    width = big + (small * _WORD_COLUMNS + 1.2 if rows else 0.6)
    figure = Figure(figsize=(width, max(big + 0.8, rows * (small + 0.35))), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(max(rows, 1), 1 + (_WORD_COLUMNS if rows else 0),
                               width_ratios=[_WORD_COLUMNS / 2] + [1] * (_WORD_COLUMNS if rows else 0))
    title = (textwrap.fill(explanation.text, 48)
             + f"\nITM match {explanation.itm_score:.2f} (fusion layer {explanation.layer})")
    if all_zero(explanation.heatmap):
        title += "\nmap " + ZERO_NOTE
    main = figure.add_subplot(grid[:, 0])
    shown = _draw(main, view, explanation.heatmap, _scale(explanation.heatmap), title, 9)
    figure.colorbar(shown, ax=main, shrink=0.6, label="Grad-CAM (caption)")
    vmax = _scale(word_maps)
    word_axes, word_shown = [], None
    for k, (word, heat) in enumerate(zip(explanation.words, word_maps)):
        axes = figure.add_subplot(grid[k // _WORD_COLUMNS, 1 + k % _WORD_COLUMNS])
        word_shown = _draw(axes, view, heat, vmax, word + (" (all zero)" if all_zero(heat) else ""), 8)
        word_axes.append(axes)
    if word_shown is not None:  # one scale for every word, so words the model does not ground stay dark
        figure.colorbar(word_shown, ax=word_axes, shrink=0.8, label="Grad-CAM (words, shared scale)")
    return figure


def save_overlay(image: Image.Image, explanation: Explanation, out_png: str | Path, words: bool = True) -> Path:
    """Write a PNG: the model's view of ``image`` with the caption heatmap, and (``words``) a grid of
    per-word maps on one shared color scale, so words the model does not ground stay dark."""
    figure = overlay_figure(image, explanation, words)
    path = Path(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
