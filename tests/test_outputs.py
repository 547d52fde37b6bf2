"""What runs and commands write for people to read: training plots, the report's VQA and examples sections,
and explanation figures that cannot be misread (all-zero maps said so, one colour scale for the words)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from vlp.cli.main import main
from vlp.config import load_config, save_config
from vlp.config.io import to_dict
from vlp.data.synthetic import SyntheticScenes
from vlp.explain import Explanation, explain, explanation_summary, overlay_figure
from vlp.models import VLPModel
from vlp.report import write_report
from vlp.report.html import _throughput_plot
from vlp.train.metrics import plot_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def saved_figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """Every matplotlib figure saved while the test runs, kept after saving (layout done)."""
    figures: list[Figure] = []
    original = Figure.savefig

    def keep(self: Figure, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        figures.append(self)
        return result

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def test_retrieval_plot_groups_scorers_by_line_style(tmp_path: Path, saved_figures: list[Figure]) -> None:
    records: list[dict[str, Any]] = [{"step": s, "loss": 1.0 / s} for s in range(1, 5)]
    for step in (2, 4):
        records.append({"step": step, **{f"eval/{scorer}/{d}_r{k}": 10.0 * k + step for scorer in ("itc", "itm")
                                         for d in ("txt", "img") for k in (1, 5, 10)}})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plot_metrics(tmp_path)
    (figure,) = [f for f in saved_figures if any("retrieval" in a.get_title() for a in f.axes)]
    for axes in figure.axes:
        lines = {line.get_label(): line for line in axes.get_lines()}
        assert len(lines) == 6
        styles = {key.split("/")[1]: set() for key in lines}
        colors: dict[str, set[Any]] = {}
        for key, line in lines.items():
            styles[key.split("/")[1]].add(line.get_linestyle())
            colors.setdefault(key.rsplit("_r", 1)[1], set()).add(line.get_color())
        assert styles == {"itc": {"-"}, "itm": {"--"}}  # one style per scorer
        assert all(len(c) == 1 for c in colors.values()) and len(set().union(*colors.values())) == 3  # K = colour
        legend = axes.get_legend()
        assert legend.get_window_extent().x0 >= axes.get_window_extent().x1  # beside the plot, not on the lines


def test_throughput_axis_starts_at_zero(saved_figures: list[Figure]) -> None:
    _throughput_plot([(10, 100.0), (20, 104.0), (30, 98.0)])
    (figure,) = saved_figures
    assert figure.axes[0].get_ylim()[0] == 0.0


VQA_RESULT = {"overall": 55.0, "per_type": {"number": 40.0, "yes/no": 70.0}, "num_questions": 30,
              "per_type_count": {"number": 12, "yes/no": 18},
              "baselines": {"question_only": {"overall": 45.0, "number": 30.0, "yes/no": 60.0},
                            "majority_answer": {"overall": 21.0, "number": 0.0, "yes/no": 35.0}},
              "baselines_info": {"majority_answer": "yes", "train_questions": 100}}


def _rows(page: str, section: str) -> list[list[str]]:
    body = page.split(f'<section id="{section}">', 1)[1].split("</section>", 1)[0]
    return [[re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", body)]


def test_vqa_section_shows_question_counts_and_every_baseline(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (tmp_path / "eval_vqa.json").write_text(json.dumps(VQA_RESULT))
    page = write_report(tmp_path).read_text()
    assert _rows(page, "vqa") == [
        ["answer type", "questions", "accuracy", "question only", "majority answer"],
        ["overall", "30", "55.00", "45.00", "21.00"],
        ["number", "12", "40.00", "30.00", "0.00"],
        ["yes/no", "18", "70.00", "60.00", "35.00"]]


@pytest.fixture(scope="module")
def tiny_model() -> VLPModel:
    torch.manual_seed(0)
    return VLPModel.from_config("albef_base_tiny").eval()


def test_a_vqa_run_without_data_test_shows_no_synthetic_retrieval_examples(tmp_path: Path,
                                                                           tiny_model: VLPModel) -> None:
    run = tmp_path / "vqa"
    run.mkdir()
    # a fine-tuning run's config holds the checkpoint's model section
    save_config(load_config(ROOT / "configs/finetune/vqa_tiny.yaml", model=to_dict(tiny_model.config)),
                run / "config.yaml")
    tiny_model.save_pretrained(run / "final")
    (run / "final" / "vqa_head.safetensors").write_bytes(b"")  # what makes final/ a VQA checkpoint
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (run / "eval_vqa.json").write_text(json.dumps(VQA_RESULT))
    page = write_report(run).read_text()
    assert '<section id="examples">' not in page
    assert "Not in this run (left out):" in page and "Retrieval examples" in page.split("Not in this run")[1]
    # the same run as a pretraining run on the synthetic data does show its own test split
    (run / "final" / "vqa_head.safetensors").unlink()
    page = write_report(run).read_text()
    assert '<section id="examples">' in page and "the synthetic test split" in page


# explanations ---------------------------------------------------------------------------------------------


def _explanation(word_maps: torch.Tensor, heatmap: torch.Tensor) -> Explanation:
    words = ["a", "red", "circle"]
    return Explanation(text="a red circle", heatmap=heatmap, token_maps=torch.cat([heatmap[None], word_maps]),
                       tokens=["[CLS]", *words], words=words, word_maps=word_maps, itm_score=0.5, layer=0,
                       image_size=32)


def test_all_zero_maps_are_named_in_the_figure_and_the_json() -> None:
    image = Image.new("RGB", (32, 32), (10, 200, 10))
    blank = _explanation(torch.zeros(3, 4, 4), torch.zeros(4, 4))
    figure = overlay_figure(image, blank)
    titles = [axes.get_title() for axes in figure.axes if axes.get_label() != "<colorbar>"]
    assert "all zero" in titles[0]
    assert titles[1:4] == ["a (all zero)", "red (all zero)", "circle (all zero)"]
    summary = explanation_summary(blank)
    assert summary["all_zero"] and "all zero" in summary["note"]
    assert [w["all_zero"] for w in summary["words"]] == [True, True, True]
    maps = torch.zeros(3, 4, 4)
    maps[1, 2, 2] = 0.3
    partly = explanation_summary(_explanation(maps, maps.mean(dim=0)))
    assert not partly["all_zero"] and "note" not in partly
    assert [w["all_zero"] for w in partly["words"]] == [True, False, True]
    assert partly["words"][1]["max"] == pytest.approx(0.3)
    assert "all zero" not in overlay_figure(image, _explanation(maps, maps.mean(dim=0))).axes[0].get_title()


def test_word_maps_share_one_colour_bar() -> None:
    import yaml

    data = yaml.safe_load((ROOT / "configs/models/albef_base_tiny.yaml").read_text())
    data["model"]["fusion"]["depth"] = 2  # the default layer is then one before the last: words get gradients
    torch.manual_seed(0)
    model = VLPModel.from_config(data).eval()
    image = SyntheticScenes(1, seed=0, split="test", image_size=32).render(0)
    result = explain(model, image, "a large red circle at the top left")
    assert float(result.word_maps.max()) > 0
    figure = overlay_figure(image, result)
    bars = [axes for axes in figure.axes if axes.get_label() == "<colorbar>"]
    assert len(bars) == 2  # the caption's map and one for all the words
    word_axes = [axes for axes in figure.axes[1:] if axes.get_label() != "<colorbar>"]
    assert len(word_axes) == len(result.words)
    limits = {axes.get_images()[1].get_clim() for axes in word_axes}
    assert limits == {(0.0, float(result.word_maps.max()))}  # one scale
    assert "Grad-CAM (words, shared scale)" in [axes.get_ylabel() for axes in bars]


def test_cli_explain_writes_the_json_beside_the_png(tmp_path: Path, tiny_model: VLPModel) -> None:
    tiny_model.save_pretrained(tmp_path / "ckpt")
    SyntheticScenes(1, seed=0, split="test", image_size=32).render(0).save(tmp_path / "scene.png")
    out = tmp_path / "map.png"
    assert main(["explain", "--checkpoint", str(tmp_path / "ckpt"), "--image", str(tmp_path / "scene.png"),
                 "--text", "a red circle", "--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["text"] == "a red circle" and [w["word"] for w in summary["words"]] == ["a", "red", "circle"]
    assert isinstance(summary["all_zero"], bool) and summary["heatmap_max"] >= 0
