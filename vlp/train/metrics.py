"""Metrics as JSON lines (``<run_dir>/metrics.jsonl``) and their plots (``<run_dir>/plots/*.png``).

Each line is one record: ``{"step": N, "<key>": value, ...}``; training and evaluation records may carry
different keys. Plots pick keys by name:

- ``loss.png``: every key containing ``loss`` (the total and each term), and the objective's term names
  ``LOSS_TERMS`` (``itc``, ``itm``, ``mlm``, ...) alone or after a ``prefix/``;
- ``lr.png``: ``lr`` and keys ending in ``/lr`` or starting with ``lr/`` (one per parameter group);
- ``temperature.png``: keys containing ``temperature`` or ``logit_scale`` (one panel each);
- ``retrieval.png``: recall keys ``[prefix/]txt_r{1,5,10}`` (image->text) and ``img_r{1,5,10}`` (text->image).

A plot is written only when its keys occur in the records.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from torch import Tensor

from vlp.errors import UserError

__all__ = ["LOSS_TERMS", "TermWindow", "MetricsLogger", "read_metrics", "plot_panels", "plot_metrics"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOSS_TERMS = ("itc", "itm", "mlm", "siglip", "distill", "vqa")
_RECALL = re.compile(r"^(?:.*/)?(txt|img)_r(1|5|10)$")


# terms that are a state of the model, not a per-batch measurement: the window reports the latest value
_LATEST_TERMS = ("temperature",)


class TermWindow:
    """The loss terms of the optimizer steps since the last training record, logged as their mean (as
    ALBEF's and Hugging Face's loggers average since the last print): one batch's ITM loss varies by a few
    hundredths, enough to misread when a head leaves its label prior. Steps whose loss was not finite are
    left out (``nonfinite_steps`` counts them) unless every step of the window was; ``temperature`` is the
    latest value."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._steps = 0

    def add(self, terms: Mapping[str, float], finite: bool) -> None:
        self._last = dict(terms)
        if finite:
            for key, value in terms.items():
                self._sums[key] = self._sums.get(key, 0.0) + value
            self._steps += 1

    def mean(self) -> dict[str, float]:
        """The window's record (each term's mean over its finite steps, else the last step's terms; the
        latest state terms), then an empty window."""
        record = dict(self._last)
        if self._steps:
            record.update({key: value / self._steps for key, value in self._sums.items()
                           if key not in _LATEST_TERMS})
        self._sums, self._last, self._steps = {}, {}, 0
        return record


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().item()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return float(value)


class MetricsLogger:
    """Appends one JSON line per ``log(record)`` call to ``<run_dir>/metrics.jsonl`` and flushes it at once.

    ``enabled=False`` (non-main ranks) makes every call a no-op and creates no file. Tensors are read with
    ``.item()``; NaN/inf are written as the JSON extensions ``NaN``/``Infinity`` that ``read_metrics`` reads back.
    ``tensorboard=True`` also writes each record's numbers as scalars (tag = key, at its step) under
    ``<run_dir>/tensorboard/``; metrics.jsonl stays the record that plots, reports and resumes read.
    """

    def __init__(self, run_dir: Path | str, enabled: bool = True, tensorboard: bool = False) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self._handle: IO[str] | None = None
        self._board: Any = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")
            if tensorboard:
                self._board = _summary_writer(Path(run_dir) / TENSORBOARD_DIR)

    def log(self, record: Mapping[str, Any]) -> None:
        """Write ``record`` (which must hold ``step``) as one line, ``step`` first."""
        if "step" not in record:
            raise ValueError(f"a metrics record needs a 'step' key, got keys {sorted(record)}")
        if self._handle is None:
            return
        line = {"step": int(record["step"])}
        line.update({key: _plain(value) for key, value in record.items() if key != "step"})
        self._handle.write(json.dumps(line) + "\n")
        self._handle.flush()
        if self._board is not None:
            for key, value in line.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._board.add_scalar(key, value, global_step=line["step"])
            self._board.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._board is not None:
            self._board.close()
            self._board = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _summary_writer(directory: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's writer needs the tensorboard package
        raise UserError("train.tensorboard: the tensorboard package is not installed; pip install "
                        "'vlp[tensorboard]' (or tensorboard), or set train.tensorboard: false") from None
    return SummaryWriter(log_dir=str(directory))


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """The records of a metrics file (or of ``<path>/metrics.jsonl`` when ``path`` is a run directory).

    A truncated last line (a crash mid-write) is skipped; a malformed line elsewhere is a ``UserError``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{path}: metrics file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise UserError(f"{path}:{number}: not a JSON record ({err.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in record:
            steps.append(float(record["step"]))
            values.append(float(value))
    return steps, values


def _numeric_keys(records: list[dict[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                keys[key] = None
    return list(keys)


def _is_loss(key: str) -> bool:
    return "loss" in key.lower() or key.rsplit("/", 1)[-1] in LOSS_TERMS


def _is_lr(key: str) -> bool:
    return key == "lr" or key.endswith("/lr") or key.startswith("lr/")


# Recall curves: one colour per K, one line style per scorer, so ITC and ITM read as two groups.
_RECALL_COLORS = {"1": "tab:blue", "5": "tab:orange", "10": "tab:green"}
_SCORER_STYLES = {"itc": ("-", "o"), "itm": ("--", "s")}


def _style(key: str) -> dict[str, Any]:
    match = _RECALL.match(key)
    if match is None:
        return {}
    scorer = key.rsplit("/", 2)[-2] if key.count("/") >= 1 else ""
    linestyle, marker = _SCORER_STYLES.get(scorer, (":", "^"))
    return {"color": _RECALL_COLORS[match.group(2)], "linestyle": linestyle, "marker": marker}


def _draw(records: list[dict[str, Any]], panels: list[tuple[str, list[str]]], ylabel: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(8.5, 3.2 * len(panels)), squeeze=False)
    try:
        for ax, (title, keys) in zip(axes[:, 0], panels):
            for key in keys:
                steps, values = _series(records, key)
                finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
                style = {"marker": "o" if len(finite) <= 50 else None, **_style(key)}
                if len(finite) > 50:
                    style["marker"] = None
                ax.plot([s for s, _ in finite], [v for _, v in finite], label=key, markersize=3, **style)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            # beside the axes, never over the curves
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


_Panels = list[tuple[str, list[str]]]


def plot_panels(records: list[dict[str, Any]]) -> dict[str, tuple[str, _Panels]]:
    """Which keys each plot shows: ``{file name: (y label, [(panel title, keys), ...])}``, plots without data left out."""
    keys = _numeric_keys(records)
    recall = {k: match for k in keys if (match := _RECALL.match(k))}

    def recall_keys(direction: str) -> list[str]:
        chosen = [k for k, match in recall.items() if match.group(1) == direction]
        return sorted(chosen, key=lambda k: int(recall[k].group(2)))

    plots: dict[str, tuple[str, _Panels]] = {
        "loss.png": ("loss", [("losses", [k for k in keys if _is_loss(k)])]),
        "lr.png": ("lr", [("learning rate", [k for k in keys if _is_lr(k)])]),
        "temperature.png": ("value", [(k, [k]) for k in keys if "temperature" in k or "logit_scale" in k]),
        "retrieval.png": ("recall (%)", [("image -> text retrieval (txt_r@K)", recall_keys("txt")),
                                         ("text -> image retrieval (img_r@K)", recall_keys("img"))]),
    }
    result = {}
    for name, (ylabel, panels) in plots.items():
        filled = [(title, panel_keys) for title, panel_keys in panels if panel_keys]
        if filled:
            result[name] = (ylabel, filled)
    return result


def plot_metrics(run_dir: Path | str) -> list[Path]:
    """Write ``loss.png``, ``lr.png``, ``temperature.png`` and ``retrieval.png`` (those with data) into
    ``<run_dir>/plots/`` from ``<run_dir>/metrics.jsonl``; returns the written paths."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / METRICS_FILE)
    plots = plot_panels(records)
    if plots:
        (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    return [_draw(records, panels, ylabel, run_dir / "plots" / name) for name, (ylabel, panels) in plots.items()]
