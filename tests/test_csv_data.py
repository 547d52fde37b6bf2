"""Pairs users bring: open_clip's CSV/TSV tables, JSON/JSONL with a ``text`` key, and the docs' webdataset recipe."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from vlp.config import load_config
from vlp.config.schema import DataConfig
from vlp.data.csv_records import CsvFormat, read_csv_records
from vlp.data.datasets import JsonPairs, WebDatasetPairs, build_pretrain_dataset
from vlp.data.retrieval_split import load_retrieval_split
from vlp.data.transforms import eval_transform
from vlp.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
TRANSFORM = eval_transform(16, (0.5,) * 3, (0.5,) * 3)
COLORS = {"a.png": (200, 30, 30), "b.png": (30, 200, 30), "c.png": (30, 30, 200)}


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for name, color in COLORS.items():
        Image.new("RGB", (20, 20), color).save(root / "sub" / name)
    return root


def _pairs(dataset: Any) -> list[tuple[str, int]]:
    return [(s["caption"], s["image_id"]) for s in (dataset[i] for i in range(len(dataset)))]


def test_tsv_in_open_clips_default_format(images: Path, tmp_path: Path) -> None:
    table = tmp_path / "pairs.tsv"
    table.write_text("filepath\ttitle\nsub/a.png\ta dog runs on the beach\nsub/b.png\ttwo people ride bikes\n"
                     "sub/a.png\ta brown dog on the sand\n")
    dataset = JsonPairs(table, images, TRANSFORM)
    assert _pairs(dataset) == [("a dog runs on the beach", 0), ("two people ride bikes", 1),
                               ("a brown dog on the sand", 0)]  # rows of one image share its id
    red = dataset[0]["image"]
    assert torch.allclose(red, TRANSFORM(Image.new("RGB", (20, 20), COLORS["a.png"])))


def test_csv_with_other_separator_and_keys_from_the_config(images: Path, tmp_path: Path) -> None:
    table = tmp_path / "pairs.csv"
    table.write_text('caption,path,image_id\n"a dog, running",sub/a.png,7\nbikes on a road,sub/b.png,8\n'
                     '"a ""quoted"" cat",sub/c.png,7\n')
    data = DataConfig(source="json", train=str(table), image_root=str(images), csv_separator=",",
                      csv_image_key="path", csv_caption_key="caption")
    dataset = build_pretrain_dataset(data, TRANSFORM, 16)
    assert _pairs(dataset) == [("a dog, running", 7), ("bikes on a road", 8), ('a "quoted" cat', 7)]
    # `csv` is open_clip's name for the same reader; the test split reads the same table
    as_csv = dataclasses.replace(data, source="csv")
    assert _pairs(build_pretrain_dataset(as_csv, TRANSFORM, 16)) == _pairs(dataset)
    split = load_retrieval_split(table, images, CsvFormat(",", "path", "caption"))
    assert split.num_images == 3 and split.captions == ["a dog, running", "bikes on a road", 'a "quoted" cat']


def test_csv_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    comma = tmp_path / "comma.csv"
    comma.write_text("filepath,title\nsub/a.png,a dog\n")
    with pytest.raises(UserError) as err:
        read_csv_records(comma)  # the default separator is a tab, as in open_clip
    assert re.search(r"comma.csv: no image column 'filepath' .*columns: \['filepath,title'\]; the header looks "
                     r"','-separated", str(err.value))
    short = tmp_path / "short.tsv"
    short.write_text("title\tfilepath\nonly a caption\n")
    with pytest.raises(UserError, match=r"short.tsv:2: 1 fields, the header has 2"):
        read_csv_records(short)
    with pytest.raises(UserError, match="no caption column 'caption'"):
        read_csv_records(short, CsvFormat(caption_key="caption"))
    assert read_csv_records(short, CsvFormat(separator="\\t", image_key="title", caption_key="title"))[0][1] \
        == {"image": "only a caption", "caption": "only a caption"}
    with pytest.raises(ConfigError, match="data.csv_separator"):
        load_config({"data": {"csv_separator": ",;"}})


def test_json_and_jsonl_with_a_text_key(images: Path, tmp_path: Path) -> None:
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps({"image": "sub/a.png", "text": "a dog runs"}) + "\n"
                     + json.dumps({"image": "sub/b.png", "text": ["two bikes", "cyclists"]}) + "\n")
    assert _pairs(JsonPairs(jsonl, images, TRANSFORM)) == [("a dog runs", 0), ("two bikes", 1), ("cyclists", 1)]
    split = load_retrieval_split(jsonl, images)
    assert split.img2txt == [[0], [1, 2]]
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"image": "sub/a.png", "words": "x"}]))
    with pytest.raises(UserError, match=r"entry 0: missing key 'caption' \(or 'text'\)"):
        JsonPairs(missing, images, TRANSFORM)


def _snippet() -> str:
    text = (ROOT / "docs" / "data.md").read_text()
    section = text[text.index("## webdataset shards"):text.index("## The embedded synthetic dataset")]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return block


def test_docs_webdataset_recipe_handles_caption_lists_and_shares_image_ids(
        images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synth = tmp_path / "data" / "synth"
    (synth / "images").mkdir(parents=True)
    for name in COLORS:
        (synth / "images" / name).write_bytes((images / "sub" / name).read_bytes())
    records = [{"image": "images/a.png", "caption": ["a red square", "a square in red"]},
               {"image": "images/b.png", "caption": "a green square"},
               {"image": "images/a.png", "text": "the red one"},
               {"image": "images/c.png", "caption": "a blue square", "image_id": 40}]
    (synth / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.chdir(tmp_path)
    exec(compile(_snippet(), "docs/data.md", "exec"), {})
    shards = WebDatasetPairs(str(tmp_path / "data" / "shards" / "train-000.tar"), TRANSFORM)
    samples = [s for s in shards if s is not None]
    assert [(s["caption"], s["image_id"]) for s in samples] == [
        ("a red square", 0), ("a square in red", 0), ("a green square", 1), ("the red one", 0),
        ("a blue square", 40)]
    assert torch.allclose(samples[0]["image"], TRANSFORM(Image.new("RGB", (20, 20), COLORS["a.png"])))
