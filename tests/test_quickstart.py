"""docs/quickstart.md's "Your own images and captions" walk-through, run as written: the table, the JSONL and the
config come from the page, the images are drawn here, and the page's commands run in that order."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

from vlp.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"red": (200, 30, 30), "green": (40, 170, 40), "blue": (30, 60, 200), "yellow": (230, 200, 20),
          "black": (15, 15, 15), "white": (240, 240, 240)}


def _section() -> str:
    text = (ROOT / "docs" / "quickstart.md").read_text()
    return text[text.index("## Your own images and captions"):text.index("## From Python")]


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def _draw(path: Path, name: str) -> None:
    color, thing = name.removesuffix(".png").split("_")
    image = Image.new("RGB", (48, 40), (120, 120, 120) if color == "white" else (250, 250, 250))
    draw = ImageDraw.Draw(image)
    shape = {"apple": draw.ellipse, "car": draw.rectangle, "cat": draw.polygon}[thing]
    if thing == "cat":
        shape([(8, 34), (24, 6), (40, 34)], fill=COLORS[color])
    else:
        shape([8, 8, 40, 32], fill=COLORS[color])
    image.save(path)


@pytest.fixture()
def walkthrough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[list[str]]]:
    section = _section()
    layout, table = _blocks(section, "text")
    (config,) = _blocks(section, "yaml")
    (jsonl,) = _blocks(section, "json")
    (commands,) = _blocks(section, "bash")
    mine = tmp_path / "data" / "mine"
    (mine / "images").mkdir(parents=True)
    names = re.findall(r"\S+\.png", layout)
    for name in names:
        _draw(mine / "images" / name, name)
    (mine / "train.tsv").write_text(table)
    (mine / "test.jsonl").write_text(jsonl)
    (tmp_path / "my_run.yaml").write_text(config)
    # the page's files agree with each other: every image they name is in the layout
    rows = [line.split("\t") for line in table.splitlines()]
    assert rows[0] == ["filepath", "title"] and all(len(row) == 2 for row in rows)
    tests = [json.loads(line) for line in jsonl.splitlines()]
    assert {row[0] for row in rows[1:]} | {t["image"] for t in tests} <= set(names)
    assert yaml.safe_load(config)["model"]["text"]["tokenizer"] == "clip"
    monkeypatch.chdir(tmp_path)
    return tmp_path, [shlex.split(line)[1:] for line in commands.strip().splitlines()]


def test_quickstart_own_data_walkthrough_runs_as_written(walkthrough: tuple[Path, list[list[str]]]) -> None:
    root, commands = walkthrough
    assert [argv[0] for argv in commands] == ["pretrain", "eval", "eval", "report"]
    for argv in commands:
        assert main(argv) == 0, argv
    run = root / "runs" / "mine"
    assert (run / "final" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 4 and any("eval/itm/img_r1" in r for r in records)
    test_eval = json.loads((run / "eval_test.json").read_text())
    train_eval = json.loads((run / "eval_train.json").read_text())
    assert (test_eval["num_images"], test_eval["num_texts"]) == (4, 8)
    assert (train_eval["num_images"], train_eval["num_texts"]) == (6, 7)  # the table's rows, grouped by image
    # the run's own final evaluation is of the same split and checkpoint
    during = json.loads((run / "eval_retrieval.json").read_text())
    assert during["itc"]["r_mean"] == pytest.approx(test_eval["itc"]["r_mean"])
    page = (run / "report.html").read_text()
    assert '<section id="examples">' in page and "data.test (data/mine/test.jsonl)" in page
    assert "a red fruit on a table" in page  # examples from the user's own captions, not the synthetic split
    # the trained tokenizer knows the words: the real-word captions round-trip
    from vlp import load

    _, tokenizer, _ = load(run)
    ids = tokenizer(["a yellow taxi in the city"])["input_ids"][0]
    assert tokenizer.decode(ids) == "a yellow taxi in the city"
