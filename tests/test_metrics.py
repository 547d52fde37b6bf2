"""Metrics JSON lines round trip and the run plots (valid PNGs, only those with data)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.errors import UserError
from vlp.train.metrics import MetricsLogger, plot_metrics, plot_panels, read_metrics


def _write_run(run_dir: Path, with_eval: bool = True) -> None:
    with MetricsLogger(run_dir) as logger:
        for step in range(1, 41):
            logger.log({"step": step, "loss": 4.0 / step, "itc": 2.5 / step, "loss_itm": 0.7,
                        "lr": 1e-4 * min(1.0, step / 10), "temperature": 0.07 - step * 1e-4, "epoch": 0})
            if with_eval and step % 10 == 0:
                logger.log({"step": step, "eval/txt_r1": 2.0 * step, "eval/txt_r5": 2.0 * step + 10,
                            "eval/txt_r10": 2.0 * step + 15, "eval/img_r1": 1.5 * step, "eval/img_r5": 1.5 * step + 8,
                            "eval/img_r10": 1.5 * step + 12, "eval/r_mean": 1.7 * step})


def test_logger_round_trip_converts_tensors_and_keeps_non_finite(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path / "run")
    logger.log({"loss": torch.tensor(1.25), "lr": 3e-4, "step": 1})
    logger.log({"step": torch.tensor(2), "loss": float("nan"), "note": "resumed", "ok": True})
    # Flushed per write: readable while the logger is still open.
    records = read_metrics(tmp_path / "run")
    logger.close()
    assert records[0] == {"step": 1, "loss": 1.25, "lr": 3e-4}
    assert list(records[0])[0] == "step"
    assert records[1]["step"] == 2 and math.isnan(records[1]["loss"])
    assert records[1]["note"] == "resumed" and records[1]["ok"] is True
    # Appends on reopen (a resumed run continues the same file).
    with MetricsLogger(tmp_path / "run") as again:
        again.log({"step": 3, "loss": 0.5})
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


def test_logger_disabled_writes_nothing_and_step_is_required(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path / "rank1", enabled=False)
    logger.log({"step": 1, "loss": 1.0})
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(ValueError, match="step"):
        MetricsLogger(tmp_path / "run").log({"loss": 1.0})


def test_read_metrics_tolerates_truncated_tail_only(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]
    path.write_text('{"step": 1\n' + json.dumps({"step": 2}) + "\n")
    with pytest.raises(UserError, match="metrics.jsonl:1"):
        read_metrics(path)
    with pytest.raises(UserError, match="not found"):
        read_metrics(tmp_path / "nothing")


def _assert_plot(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] >= 200 and pixels.shape[1] == 850  # figsize 8.5 in (legend beside the axes) x 100 dpi
    assert pixels.std() > 10  # not a blank canvas
    return pixels


def test_plot_metrics_writes_every_plot_with_data(tmp_path: Path) -> None:
    _write_run(tmp_path)
    written = plot_metrics(tmp_path)
    assert sorted(p.name for p in written) == ["loss.png", "lr.png", "retrieval.png", "temperature.png"]
    assert all(p.parent == tmp_path / "plots" for p in written)
    panels = plot_panels(read_metrics(tmp_path))
    assert panels["loss.png"] == ("loss", [("losses", ["loss", "itc", "loss_itm"])])  # not epoch
    assert panels["lr.png"][1] == [("learning rate", ["lr"])]
    assert panels["temperature.png"][1] == [("temperature", ["temperature"])]
    assert panels["retrieval.png"][1] == [
        ("image -> text retrieval (txt_r@K)", ["eval/txt_r1", "eval/txt_r5", "eval/txt_r10"]),
        ("text -> image retrieval (img_r@K)", ["eval/img_r1", "eval/img_r5", "eval/img_r10"]),
    ]
    heights = {p.name: _assert_plot(p).shape[0] for p in written}
    assert heights["retrieval.png"] == 2 * heights["loss.png"]  # one panel per retrieval direction


def test_plot_metrics_skips_plots_without_data(tmp_path: Path) -> None:
    _write_run(tmp_path, with_eval=False)
    with MetricsLogger(tmp_path) as logger:
        logger.log({"step": 41, "loss": float("inf"), "lr": 1e-4})  # non-finite points are left out of the lines
    written = plot_metrics(tmp_path)
    assert sorted(p.name for p in written) == ["loss.png", "lr.png", "temperature.png"]
    assert not (tmp_path / "plots" / "retrieval.png").exists()
    for path in written:
        _assert_plot(path)


def test_term_window_means_finite_steps_and_keeps_the_latest_temperature() -> None:
    from vlp.train.metrics import TermWindow

    window = TermWindow()
    window.add({"itm": 0.6, "temperature": 0.07}, finite=True)
    window.add({"itm": float("nan"), "temperature": 0.06}, finite=False)  # counted by nonfinite_steps, not here
    window.add({"itm": 0.4, "temperature": 0.05}, finite=True)
    assert window.mean() == pytest.approx({"itm": 0.5, "temperature": 0.05})
    window.add({"itm": float("nan"), "temperature": 0.05}, finite=False)  # a window of only non-finite steps
    record = window.mean()
    assert math.isnan(record["itm"]) and record["temperature"] == 0.05
    assert window.mean() == {}  # each record starts a new window
