from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlp.cli.main import main
from vlp.config import load_config
from vlp.errors import UserError
from vlp.models import VLPModel
from vlp.report import SECTIONS, write_report
from vlp.report.examples import retrieval_examples
from vlp.train.eval_data import retrieval_split_for
from vlp.train.loop import pretrain

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
PER_TYPE = {"number": 40.5, "other": 55.0, "yes/no": 88.75}
QUESTION_ONLY = {"overall": 44.5, "number": 33.25, "other": 21.5, "yes/no": 72.125}
COUNTS = {"number": 20, "other": 24, "yes/no": 20}
VQA_RESULT = {"overall": 61.25, "per_type": PER_TYPE, "num_questions": 64, "per_type_count": COUNTS,
              "baselines": {"question_only": QUESTION_ONLY,
                            "majority_answer": {"overall": 20.5, "number": 0.0, "other": 0.0, "yes/no": 71.0}},
              "baselines_info": {"majority_answer": "yes", "train_questions": 512, "unseen_questions": 0}}


class _Page(HTMLParser):
    """Section ids, image sources, table cells and list items of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.cells: list[str] = []
        self.classes: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "section":
            self.sections.append(values.get("id") or "")
        if tag == "img":
            self.images.append(values.get("src") or "")
        if tag in ("td", "th"):
            self._in_cell = True
            self.cells.append("")
        self.classes.append(f"{tag}.{values.get('class') or ''}")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.cells[-1] += data


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _load(src: str, base: Path) -> Image.Image:
    if src.startswith("data:"):
        header, payload = src.split(",", 1)
        assert header.endswith(";base64")
        data = base64.b64decode(payload)
    else:
        data = (base / src).read_bytes()
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    overrides = ["eval.every=1", "train.max_steps=2", "train.checkpoint_every=0", "data.synthetic_test_size=12"]
    config = load_config(ROOT / "configs/pretrain/demo_tiny.yaml", overrides)
    run = pretrain(config, output_dir=tmp_path_factory.mktemp("report") / "run")
    (run / "eval_vqa.json").write_text(json.dumps(VQA_RESULT))
    return run


def test_report_has_every_section_and_every_image_loads(run_dir: Path) -> None:
    (run_dir / "plots" / "loss.png").unlink()  # regenerated from metrics.jsonl
    out = write_report(run_dir)
    assert out == run_dir / "report.html" and (run_dir / "plots" / "loss.png").is_file()
    page = _parse(out)
    assert page.sections == list(SECTIONS)
    # 4 plots from the loop (loss, lr, temperature, retrieval) + recall@K + throughput + thumbnails
    assert len(page.images) >= 6 + 8 * 5 + 4
    for src in page.images:
        image = _load(src, run_dir)
        assert image.size[0] >= 16 and image.size[1] >= 16
    text = out.read_text()
    assert "name: demo_tiny" in text and "Not in this run" not in text
    # numbers come from the run's files
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in records if "eval/itm/img_r5" in r][-1]
    final = json.loads((run_dir / "eval_retrieval.json").read_text())
    assert f"{last_eval['eval/itm/img_r5']:.2f}" in page.cells
    assert f"{final['itc']['r_mean']:.2f}" in page.cells
    for kind, value in PER_TYPE.items():
        index = page.cells.index(kind)
        assert page.cells[index + 1] == str(COUNTS[kind])  # questions of the type, then their accuracy
        assert page.cells[index + 2] == f"{value:.2f}"
        assert f"{QUESTION_ONLY[kind]:.2f}" in page.cells[index + 3:index + 6]  # the question-only baseline
    assert "question only" in page.cells and "majority answer" in page.cells
    rates = [r["samples_per_s"] for r in records if "samples_per_s" in r]
    assert f"{rates[-1]:.2f}" in page.cells


def test_cli_report_and_retrieval_examples_match_a_direct_ranking(run_dir: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(run_dir)]) == 0
    assert str(run_dir / "report.html") in capsys.readouterr().out
    model = VLPModel.from_pretrained(run_dir / "final")
    split = retrieval_split_for(load_config(run_dir / "config.yaml"), 32)
    examples = retrieval_examples(model, split, num_images=12, text_queries=3, image_queries=2, top_k=5)
    gallery = split.first(12)
    assert examples.num_images == 12 and examples.num_texts == len(gallery.captions) == 60
    transform = model.image_transform()
    with torch.no_grad():
        images = model.encode_image(torch.stack([transform(gallery.load_image(i)) for i in range(12)]))
        tokens = model.tokenizer(gallery.captions, model.config.text.max_length)
        texts = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    similarity = images @ texts.T
    assert [q.index for q in examples.image_queries] == [0, 11]
    for query in examples.text_queries:
        assert query.shown == gallery.captions[query.index]
        expected = similarity[:, query.index].topk(5)
        assert [h.index for h in query.hits] == expected.indices.tolist()
        torch.testing.assert_close(torch.tensor([h.score for h in query.hits]), expected.values)
        assert [h.correct for h in query.hits] == [gallery.txt2img[query.index] == h.index for h in query.hits]
    for query in examples.image_queries:
        expected = similarity[query.index].topk(5)
        assert [h.index for h in query.hits] == expected.indices.tolist()
        assert [h.correct for h in query.hits] == [h.index in gallery.img2txt[query.index] for h in query.hits]
        assert [h.shown for h in query.hits] == [gallery.captions[h.index] for h in query.hits]


def test_report_leaves_out_missing_parts(run_dir: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(run_dir / "metrics.jsonl", partial / "metrics.jsonl")
    page = _parse(write_report(partial))
    assert page.sections == ["summary", "curves", "recall-training", "throughput"]
    text = (partial / "report.html").read_text()
    assert "Not in this run (left out): Configuration, Final retrieval, Retrieval examples, VQA accuracy." in text
    assert (partial / "plots" / "loss.png").is_file()
    for src in page.images:
        _load(src, partial)
    # an unloadable final/ checkpoint leaves out only the examples, and the page says why
    broken = tmp_path / "broken"
    (broken / "final").mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", broken / "config.yaml")
    (broken / "final" / "config.yaml").write_text("format_version: 99\n")
    assert _parse(write_report(broken)).sections == ["summary", "config"]
    assert "retrieval examples: " in (broken / "report.html").read_text()
    assert "unsupported checkpoint format_version 99" in (broken / "report.html").read_text()


def test_report_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError, match="not a vlp run directory"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("name: x\n")
    (tmp_path / "eval_vqa.json").write_text("{broken")
    assert main(["report", str(tmp_path)]) == 2
    assert "eval_vqa.json: not valid JSON" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium package")
def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    out = write_report(run_dir)
    shot = tmp_path / "report.png"
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tempfile.mkdtemp()}", f"--screenshot={shot}", "--window-size=1280,2400",
                    out.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is not None and len(colors) > 100  # text, tables and plots, not a blank page
