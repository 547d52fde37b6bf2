"""``write_report(run_dir)``: one static, self-contained HTML page about a run (images embedded as data URIs).

Sections: summary, resolved config, training curves (loss, lr, temperature), retrieval recall@K over
training, final retrieval, retrieval examples, VQA accuracy per answer type, throughput. A part whose
inputs the run lacks is left out and listed under "Not in this run".
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlp.errors import UserError
from vlp.report.examples import RetrievalExamples

__all__ = ["write_report", "SECTIONS"]

# id -> heading, in page order
SECTIONS: dict[str, str] = {
    "summary": "Summary", "config": "Configuration", "curves": "Training curves",
    "recall-training": "Retrieval recall@K during training", "final-retrieval": "Final retrieval",
    "examples": "Retrieval examples", "vqa": "VQA accuracy", "throughput": "Throughput",
}
_RECALL_COLUMNS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
_EVAL_RECALL = re.compile(r"^eval/(\w+)/(" + "|".join(_RECALL_COLUMNS) + r")$")
_CSS = """
body { font-family: sans-serif; max-width: 1150px; margin: 1.5em auto; color: #222; padding: 0 1em; }
nav a { margin-right: 1em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
pre { background: #f6f6f6; padding: .8em; max-height: 28em; overflow: auto; font-size: 12px; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: .25em .6em; text-align: right; } th { background: #f0f0f0; }
td.text, th.text { text-align: left; } figure { display: inline-block; margin: .4em; vertical-align: top; }
figure img { max-width: 100%; } figure.half img { width: 540px; } .missing { color: #8a5a00; }
figcaption { font-size: 12px; color: #555; text-align: center; }
.query { margin: .8em 0; } .thumbs { display: flex; gap: .5em; flex-wrap: wrap; align-items: flex-start; }
.thumb { text-align: center; font-size: 11px; }
.thumb img { width: 96px; height: 96px; image-rendering: pixelated; border: 4px solid #c0392b; }
.thumb.ok img { border-color: #27ae60; } li.ok { color: #1e7d45; font-weight: bold; } li.bad { color: #555; }
.qimg { width: 96px; height: 96px; image-rendering: pixelated; float: left; margin-right: 1em; }
.imgquery { overflow: hidden; margin: .8em 0; } .imgquery ol { margin: 0 0 0 120px; }
"""


def _file_uri(path: Path) -> str:
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(path.suffix.lower(), "image/png")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figure(uri: str, caption: str, half: bool = False) -> str:
    kind = ' class="half"' if half else ""
    text = html.escape(caption)
    return f'<figure{kind}><img src="{uri}" alt="{text}"><figcaption>{text}</figcaption></figure>'


def _number(value: Any, digits: int = 2) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "n/a" if value is None else html.escape(str(value))
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f'<th class="{"text" if k == 0 else ""}">{html.escape(h)}</th>' for k, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"text" if k == 0 or isinstance(v, str) else ""}">{_number(v)}</td>'
                                     for k, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class _Report:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.notes: list[str] = []  # why a section that had inputs was still left out
        config_path = root / "config.yaml"
        self.config_text = config_path.read_text() if config_path.is_file() else None
        metrics_path = root / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        if metrics_path.is_file():
            from vlp.train.metrics import plot_metrics, plot_panels, read_metrics

            self.records = read_metrics(metrics_path)
            if any(not (root / "plots" / name).is_file() for name in plot_panels(self.records)):
                plot_metrics(root)  # the run stopped before writing them, or they were deleted

    def _plot(self, name: str, caption: str, half: bool = False) -> str | None:
        path = self.root / "plots" / name
        return _figure(_file_uri(path), caption, half) if path.is_file() else None

    def _json(self, name: str) -> dict[str, Any] | None:
        path = self.root / name
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err.msg})") from None
        return data if isinstance(data, dict) else None

    # sections ----------------------------------------------------------------------------------
    def summary(self) -> str:
        training = [r for r in self.records if "loss" in r]
        rows: list[list[Any]] = [["run directory", str(self.root.resolve())]]
        name = re.search(r"^name:\s*(\S+)", self.config_text or "", re.MULTILINE)
        if name:
            rows.append(["config name", name.group(1)])
        if training:
            last = training[-1]
            rows += [["optimizer steps", last.get("step")], ["final training loss", last.get("loss")],
                     ["final lr", f"{last['lr']:.3g}" if isinstance(last.get("lr"), float) else last.get("lr")]]
        rows.append(["final/ checkpoint", "present" if (self.root / "final").is_dir() else "absent"])
        rows.append(["report written", datetime.datetime.now().strftime("%Y-%m-%d %H:%M")])
        return _table(["", "value"], rows)

    def config(self) -> str | None:
        if self.config_text is None:
            return None
        return f"<p>The fully resolved config (config.yaml).</p><pre>{html.escape(self.config_text)}</pre>"

    def curves(self) -> str | None:
        figures = [self._plot(n, c, half=True) for n, c in (("loss.png", "loss terms"), ("lr.png", "learning rate"),
                                                 ("temperature.png", "contrastive temperature"))]
        kept = [f for f in figures if f]
        return "".join(kept) if kept else None

    def recall_training(self) -> str | None:
        columns = sorted({(m.group(1), m.group(2)) for r in self.records for k in r if (m := _EVAL_RECALL.match(k))},
                         key=lambda c: (c[0], _RECALL_COLUMNS.index(c[1])))
        if not columns:
            return None
        evals = [r for r in self.records if any(f"eval/{s}/{m}" in r for s, m in columns)]
        header = ["step"] + [f"{scorer} {metric}" for scorer, metric in columns]
        rows = [[r["step"]] + [r.get(f"eval/{s}/{m}") for s, m in columns] for r in evals]
        plot = self._plot("retrieval.png", "recall@K on the held-out split (%)") or ""
        return (plot + "<p>txt_r@K: image query -> captions; img_r@K: text query -> images (percent; itc = "
                "contrastive ranking, itm = re-ranked by the match head).</p>" + _table(header, rows))

    def final_retrieval(self) -> str | None:
        result = self._json("eval_retrieval.json")
        if result is None:
            return None
        scorers = [s for s in ("itc", "itm") if isinstance(result.get(s), dict)]
        rows = [[s] + [result[s].get(m) for m in _RECALL_COLUMNS] for s in scorers]
        meta = ", ".join(f"{k} = {html.escape(str(result[k]))}" for k in ("num_images", "num_texts", "k_test", "score")
                         if k in result)
        plot = self._plot("recall_at_k.png", "final recall@K for K = 1..") or ""
        return f"<p>eval_retrieval.json ({meta}).</p>" + _table(["scorer", *_RECALL_COLUMNS], rows) + plot

    def examples(self) -> str | None:
        if not (self.root / "final").is_dir() or self.config_text is None:
            return None
        from vlp.config import load_config
        from vlp.models import VLPModel
        from vlp.report.examples import retrieval_examples
        from vlp.train.eval_data import retrieval_split_for

        try:  # a report should still come out when only the examples cannot be made
            config = load_config(self.root / "config.yaml")
            if not config.data.test and (self.root / "final" / "vqa_head.safetensors").is_file():
                return None  # a VQA fine-tune: the built-in synthetic split is not its data
            model = VLPModel.from_pretrained(self.root / "final")
            split = retrieval_split_for(config, model.image_encoder.image_size)
        except UserError as err:
            self.notes.append(f"retrieval examples: {err}")
            return None
        if split is None:
            return None
        source = f"data.test ({config.data.test})" if config.data.test else "the synthetic test split"
        return _examples_html(retrieval_examples(model, split), source)

    def vqa(self) -> str | None:
        result = self._json("eval_vqa.json")
        if result is None:
            return None
        per_type = result.get("per_type") or {}
        counts = result.get("per_type_count") or {}
        rows: list[list[Any]] = [["overall", result.get("num_questions"), result.get("overall")]]
        rows += [[kind, counts.get(kind), value] for kind, value in sorted(per_type.items())]
        header, rows, note = _with_baselines(["answer type", "questions", "accuracy"], rows, result)
        count = result.get("num_questions")
        return (f"<p>VQA accuracy (official metric, %) on {html.escape(str(count))} questions "
                f"(eval_vqa.json).{note}</p>" + _table(header, rows))

    def throughput(self) -> str | None:
        rates = [(r["step"], float(r["samples_per_s"])) for r in self.records
                 if isinstance(r.get("samples_per_s"), int | float) and "step" in r]
        if not rates:
            return None
        values = [v for _, v in rates]
        batch = next((r["effective_batch_size"] for r in self.records if "effective_batch_size" in r), None)
        rows = [["median samples/s", statistics.median(values)], ["mean samples/s", statistics.fmean(values)],
                ["last samples/s", values[-1]], ["effective batch size", batch]]
        note = ("<p>Training samples per second over each logging window (all processes); "
                "the window that holds an evaluation or checkpoint is slower.</p>")
        return note + _table(["", "value"], rows) + _figure(_throughput_plot(rates), "samples/s per logging window")


def _with_baselines(header: list[str], rows: list[list[Any]],
                    result: dict[str, Any]) -> tuple[list[str], list[list[Any]], str]:
    """One more column per image-blind baseline of the result's ``baselines`` ({name: {row label: %}}),
    and a sentence saying what they are; the table unchanged when the result has none."""
    baselines = {name: values for name, values in (result.get("baselines") or {}).items() if isinstance(values, dict)}
    if not baselines:
        return header, rows, ""
    header = header + [name.replace("_", " ") for name in baselines]
    rows = [row + [values.get(row[0]) for values in baselines.values()] for row in rows]
    info = result.get("baselines_info") or {}
    majority = f' ("{html.escape(str(info["majority_answer"]))}")' if "majority_answer" in info else ""
    note = (" Baselines that never see the image, from the training answers: question only answers each "
            f"question with its most frequent training answer; majority answer{majority} answers every "
            "question alike. Accuracy well above question only is what the image contributes.")
    return header, rows, note


def _throughput_plot(rates: list[tuple[int, float]]) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 2.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot([s for s, _ in rates], [v for _, v in rates], marker="o" if len(rates) <= 50 else None, markersize=3)
    axes.set_xlabel("step")
    axes.set_ylabel("samples/s")
    axes.set_ylim(bottom=0)  # from zero: a few percent of jitter must not look like a collapse
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _examples_html(examples: RetrievalExamples, source: str) -> str:
    parts = [f"<p>Ranked by ITC cosine similarity among the first {examples.num_images} images of "
             f"{html.escape(source)} and their {examples.num_texts} captions; correct results are green.</p>"
             "<h3>Text -> image (top 5)</h3>"]
    for query in examples.text_queries:
        thumbs = "".join(f'<div class="thumb {"ok" if hit.correct else "bad"}"><img src="{hit.shown}" alt="result">'
                         f'<br>{"&#10003; " if hit.correct else ""}{hit.score:.2f}</div>' for hit in query.hits)
        parts.append(f'<div class="query"><b>{html.escape(query.shown)}</b><div class="thumbs">{thumbs}</div></div>')
    parts.append("<h3>Image -> text (top 5)</h3>")
    for query in examples.image_queries:
        items = "".join(f'<li class="{"ok" if hit.correct else "bad"}">{"&#10003; " if hit.correct else ""}'
                        f'{html.escape(hit.shown)} ({hit.score:.2f})</li>' for hit in query.hits)
        parts.append(f'<div class="imgquery"><img class="qimg" src="{query.shown}" alt="query"><ol>{items}</ol></div>')
    return "".join(parts)


def write_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report.html`` and return its path; the page needs no server and no other file."""
    root = Path(run_dir)
    if not root.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    if not (root / "config.yaml").is_file() and not (root / "metrics.jsonl").is_file():
        raise UserError(f"{run_dir}: not a vlp run directory (no config.yaml or metrics.jsonl)")
    report = _Report(root)
    builders: dict[str, Callable[[], str | None]] = {
        "summary": report.summary, "config": report.config, "curves": report.curves,
        "recall-training": report.recall_training, "final-retrieval": report.final_retrieval,
        "examples": report.examples, "vqa": report.vqa, "throughput": report.throughput,
    }
    bodies = {key: build() for key, build in builders.items()}
    missing = [SECTIONS[key] for key, body in bodies.items() if body is None]
    if missing:
        bodies["summary"] = (bodies["summary"] or "") + (
            '<p class="missing">Not in this run (left out): ' + html.escape(", ".join(missing)) + ".</p>")
    bodies["summary"] = (bodies["summary"] or "") + "".join(
        f'<p class="missing">{html.escape(note)}</p>' for note in report.notes)
    title = f"vlp run report: {root.resolve().name}"
    nav = "".join(f'<a href="#{key}">{SECTIONS[key]}</a>' for key, body in bodies.items() if body is not None)
    sections = "".join(f'<section id="{key}"><h2>{SECTIONS[key]}</h2>{body}</section>'
                       for key, body in bodies.items() if body is not None)
    head = f'<meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style>'
    page = (f'<!DOCTYPE html><html lang="en"><head>{head}</head><body><h1>{html.escape(title)}</h1>'
            f"<nav>{nav}</nav>{sections}</body></html>\n")
    out = root / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
