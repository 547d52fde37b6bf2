"""The comparison table of a benchmark run: results.json, results.md (one row per task/metric, one column per
checkpoint, then the protocol of every number) and results.png (the same table as a heatmap)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["table_rows", "write_results", "checkpoint_labels"]


def checkpoint_labels(checkpoints: list[str]) -> list[str]:
    """Short distinct column names: the last path parts that tell the checkpoints apart."""
    parts = [Path(c).resolve().parts for c in checkpoints]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(c) for c in checkpoints]


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """[{task, metric, values: {checkpoint label: value or None}}] in suite order, metrics in first-seen order."""
    labels = results["checkpoints"]
    rows = []
    for task, entry in results["tasks"].items():
        metrics: list[str] = []
        for label in labels:
            for metric in (entry["runs"].get(label) or {}).get("metrics", {}):
                if metric not in metrics:
                    metrics.append(metric)
        for metric in metrics:
            values = {label: (entry["runs"].get(label) or {}).get("metrics", {}).get(metric) for label in labels}
            rows.append({"task": task, "metric": metric, "values": values})
    return rows


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _markdown(results: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    labels = results["checkpoints"]
    lines = [f"# Benchmark: {results['suite']}", "",
             "Checkpoints: " + ", ".join(f"`{label}` = {path}" for label, path in
                                          zip(labels, results["checkpoint_paths"])), "",
             "| task | metric | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for row in rows:
        lines.append(f"| {row['task']} | {row['metric']} | "
                     + " | ".join(_cell(row["values"][label]) for label in labels) + " |")
    if results["failed"]:
        lines += ["", "## Failed", ""] + [f"- {line}" for line in results["failed"]]
    lines += ["", "## Protocol", "",
              "Metrics are percentages. Retrieval: txt_r@K = image queries (any of the image's captions is a "
              "hit), img_r@K = text queries. Ties rank pessimistically / count as wrong.", ""]
    for task, entry in results["tasks"].items():
        lines.append(f"### {task} ({entry['type']})")
        lines.append("")
        lines.append("- settings: " + ", ".join(f"{k}={v}" for k, v in entry["settings"].items() if k != "type"))
        for label in labels:
            run = entry["runs"].get(label)
            if not run:
                continue
            protocol = ", ".join(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}"
                                 for k, v in run["protocol"].items() if v is not None)
            lines.append(f"- `{label}` ({run['seconds']:.1f} s): {protocol}")
        lines.append("")
    return "\n".join(lines) + "\n"


def _heatmap(results: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = results["checkpoints"]
    values = np.array([[np.nan if row["values"][label] is None else float(row["values"][label]) for label in labels]
                       for row in rows] or [[np.nan] * len(labels)])
    names = [f"{row['task']}: {row['metric']}" for row in rows] or ["(no results)"]
    fig, ax = plt.subplots(figsize=(3 + 1.6 * len(labels), 1 + 0.28 * len(names)))
    ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    for (i, j), value in np.ndenumerate(values):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=7,
                    color="white" if value < 60 else "black")
    ax.set_title(f"{results['suite']} (percent)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(results: dict[str, Any], output: Path) -> dict[str, Path]:
    """Write results.json (with the table rows), results.md and results.png under ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    rows = table_rows(results)
    files = {"json": output / "results.json", "md": output / "results.md", "png": output / "results.png"}
    files["json"].write_text(json.dumps({**results, "rows": rows}, indent=2, default=str) + "\n")
    files["md"].write_text(_markdown(results, rows))
    _heatmap(results, rows, files["png"])
    return files
