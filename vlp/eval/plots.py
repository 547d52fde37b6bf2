"""Recall@K curves of a retrieval evaluation as a PNG."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlp.errors import UserError

__all__ = ["plot_recall_curve"]

DIRECTIONS = {"txt": "image -> text", "img": "text -> image"}


def plot_recall_curve(results: Mapping[str, Any], out_png: str | Path) -> Path:
    """Plot recall@K for K = 1..max, one panel per direction, one line per scorer (ITC, ITM).

    ``results`` is evaluate_retrieval's result (its "curves") or the curves themselves:
    {"itc": {"txt": [R@1, R@2, ...], "img": [...]}, "itm": {...}}. Returns the written path.
    """
    # The object-oriented Agg API leaves the user's pyplot backend and global state alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = results.get("curves", results)
    valid = all(isinstance(curve, Mapping) and set(DIRECTIONS) <= set(curve) for curve in curves.values())
    if not curves or not valid:
        raise UserError("plot_recall_curve needs recall curves: {'itc': {'txt': [...], 'img': [...]}, ...}")
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    for column, (direction, title) in enumerate(DIRECTIONS.items()):
        axes = figure.add_subplot(1, 2, column + 1)
        for scorer, curve in curves.items():
            recalls = list(curve[direction])
            axes.plot(range(1, len(recalls) + 1), recalls, marker=".", label=scorer.upper())
        axes.set_title(f"{title} retrieval")
        axes.set_xlabel("K")
        axes.set_ylabel("recall@K (%)")
        axes.set_ylim(0, 100)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    path = Path(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
