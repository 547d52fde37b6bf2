"""vlp.data loaders, transforms, collation, retrieval/VQA/zero-shot splits: every source through a DataLoader,
bad files skipped and counted, odd image modes converted, bad data files reported as UserError."""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from vlp.config.schema import DataConfig
from vlp.data import (
    Collator,
    HFPairs,
    ImageDataset,
    JsonPairs,
    SyntheticPairs,
    SyntheticScenes,
    VQADataset,
    WebDatasetPairs,
    build_pretrain_dataset,
    eval_transform,
    load_retrieval_split,
    load_vqa,
    load_zeroshot,
    open_image,
    seed_worker,
    synthetic_retrieval_split,
    train_transform,
)
from vlp.errors import ConfigError, UserError
from vlp.registry import datasets as dataset_registry

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
SIZE = 16
EVAL = eval_transform(SIZE, MEAN, STD)


class WordTokenizer:
    """Stand-in for vlp's Tokenizer: [CLS]=1, words get ids from 3 on, padded with 0 to the longest."""

    pad_id, mask_id, vocab_size = 0, 2, 1000

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, texts: list[str], max_length: int) -> dict[str, Tensor]:
        rows = [[1] + [self.vocab.setdefault(w, 3 + len(self.vocab)) for w in t.split()] for t in texts]
        rows = [r[:max_length] for r in rows]
        longest = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (longest - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": ids != 0}


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (20, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _loader(dataset: Any, workers: int = 2, batch_size: int = 3) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                      collate_fn=Collator(WordTokenizer(), 16),
                      worker_init_fn=seed_worker)


def _drain(loader: DataLoader) -> tuple[list[str], list[int], int]:
    captions, ids, bad = [], [], 0
    for batch in loader:
        assert batch["images"].shape[1:] == (3, SIZE, SIZE) or batch["images"].shape[0] == 0
        assert batch["attention_mask"].dtype == torch.bool and batch["image_ids"].dtype == torch.long
        captions += batch["captions"]
        ids += batch["image_ids"].tolist()
        bad += batch["bad"]
    return captions, ids, bad


# ---------------------------------------------------------------- transforms and image modes

def test_eval_and_train_transforms_match_open_clip() -> None:
    image = Image.fromarray((np.random.RandomState(0).rand(30, 44, 3) * 255).astype(np.uint8))
    reference = open_clip.image_transform(SIZE, is_train=False, mean=MEAN, std=STD)
    assert torch.allclose(EVAL(image), reference(image), atol=1e-6)
    reference_train = open_clip.image_transform(SIZE, is_train=True, mean=MEAN, std=STD)
    ours = train_transform(SIZE, MEAN, STD, crop_scale=(0.9, 1.0))
    for seed in range(3):
        torch.manual_seed(seed)
        expected = reference_train(image)
        torch.manual_seed(seed)
        assert torch.allclose(ours(image), expected, atol=1e-6)
    flip_names = [type(t).__name__ for t in train_transform(SIZE, MEAN, STD, hflip=True).transforms]
    assert "RandomHorizontalFlip" in flip_names
    assert "RandomHorizontalFlip" not in [type(t).__name__ for t in ours.transforms]


def test_image_modes_converted_to_rgb(tmp_path: Path) -> None:
    Image.new("L", (4, 4), 77).save(tmp_path / "gray.png")
    rgba = Image.new("RGBA", (4, 4), (10, 200, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(tmp_path / "rgba.png")
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    Image.fromarray(np.full((4, 4), 257 * 100, dtype=np.uint16)).save(tmp_path / "deep.png")
    palette = Image.new("RGB", (4, 4), (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(tmp_path / "palette.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert open_image(tmp_path / "gray.png").getpixel((1, 1)) == (77, 77, 77)
    converted = open_image(tmp_path / "rgba.png")
    assert converted.getpixel((0, 0)) == (255, 255, 255) and converted.getpixel((2, 2)) == (10, 200, 30)
    assert np.abs(np.asarray(open_image(tmp_path / "cmyk.jpg"))[1, 1].astype(int) - (255, 0, 0)).max() <= 3
    # 16-bit is rescaled, not clipped to 255
    assert open_image(tmp_path / "deep.png").getpixel((1, 1)) == (100, 100, 100)
    assert open_image(tmp_path / "palette.png").getpixel((1, 1)) == (200, 10, 10)
    assert open_image((tmp_path / "gray.png").read_bytes()).mode == "RGB"


# ---------------------------------------------------------------- JSON / JSONL pairs

def _bad_files(root: Path) -> None:
    good = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(good, format="PNG")
    (root / "truncated.png").write_bytes(good.getvalue()[:60])
    (root / "text.png").write_bytes(b"this is not an image")


def test_json_pairs_expand_caption_lists_and_skip_bad_samples(tmp_path: Path, caplog: Any) -> None:
    for k in range(3):
        _png(tmp_path / f"img/{k}.png", (k * 60, 0, 0))
    _bad_files(tmp_path)
    records = [{"image": "img/0.png", "caption": ["zero a", "zero b"]},
               {"image": "img/1.png", "caption": "one", "image_id": 41},
               {"image": "img/2.png", "caption": ["two"]},
               {"image": "missing.png", "caption": "gone"},
               {"image": "truncated.png", "caption": "cut"},
               {"image": "text.png", "caption": "text"},
               {"image": "img/2.png", "caption": "  "}]
    (tmp_path / "pairs.json").write_text(json.dumps(records))
    data = JsonPairs(tmp_path / "pairs.json", tmp_path, EVAL)
    assert len(data) == 8
    assert [s[2] for s in data.samples] == [0, 0, 41, 1, 2, 3, 4, 1]
    with caplog.at_level(logging.WARNING, logger="vlp.data.datasets"):
        samples = [data[i] for i in range(len(data))] + [data[4]]
    assert [s is None for s in samples] == [False] * 4 + [True] * 5
    assert (data.samples_read, data.bad_samples) == (9, 5)
    assert sum("missing.png" in r.getMessage() for r in caplog.records) == 1  # logged once
    first = samples[0]
    assert first is not None and first["caption"] == "zero a" and first["image"].shape == (3, SIZE, SIZE)
    assert torch.allclose(first["image"], EVAL(Image.new("RGB", (20, 24), (0, 0, 0))))
    captions, ids, bad = _drain(_loader(data))
    assert sorted(captions) == ["one", "two", "zero a", "zero b"] and bad == 4
    assert sorted(ids) == [0, 0, 1, 41]


def test_jsonl_with_bad_bytes_and_bad_files(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", (0, 9, 0))
    lines = [json.dumps({"image": "a.png", "caption": "caf\u00e9 ok"}).encode(), b"",
             b'{"image": "a.png", "caption": "x\xff y"}']
    (tmp_path / "pairs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    data = JsonPairs(tmp_path / "pairs.jsonl", tmp_path, EVAL)
    samples = [data[i] for i in range(2)]
    assert [s["caption"] for s in samples if s is not None] == ["caf\u00e9 ok", "x\ufffd y"]
    assert [s[2] for s in data.samples] == [0, 0]
    (tmp_path / "broken.jsonl").write_text('{"image": "a.png", "caption": "ok"}\n{"image": "a.png", \n')
    with pytest.raises(UserError, match=r"broken.jsonl:2: malformed JSON line"):
        JsonPairs(tmp_path / "broken.jsonl", tmp_path, EVAL)
    (tmp_path / "nocap.json").write_text('[{"image": "a.png"}]')
    with pytest.raises(UserError, match=r"nocap.json: entry 0: missing key 'caption'"):
        JsonPairs(tmp_path / "nocap.json", tmp_path, EVAL)
    with pytest.raises(UserError, match="data file not found: .*absent.json"):
        JsonPairs(tmp_path / "absent.json", tmp_path, EVAL)


# ---------------------------------------------------------------- Hugging Face datasets

def test_hf_save_to_disk_and_imagefolder(tmp_path: Path) -> None:
    import datasets as hf_datasets

    rows = {"image": [Image.new("RGB", (10, 10), (k * 40, 0, 0)) for k in range(3)],
            "captions": [["a0", "b0"], ["a1"], ["a2", "b2", "c2"]]}
    saved = hf_datasets.Dataset.from_dict(rows).cast_column("image", hf_datasets.Image())
    saved.save_to_disk(str(tmp_path / "saved"))
    data = HFPairs(tmp_path / "saved", EVAL)
    assert len(data) == 6 and data.caption_column == "captions"
    sample = data[5]
    assert sample is not None and (sample["caption"], sample["image_id"]) == ("c2", 2)
    assert torch.allclose(sample["image"], EVAL(Image.new("RGB", (10, 10), (80, 0, 0))))
    captions, ids, bad = _drain(_loader(data))
    assert sorted(captions) == ["a0", "a1", "a2", "b0", "b2", "c2"] and sorted(ids) == [0, 0, 1, 2, 2, 2]

    folder = tmp_path / "folder"
    for k in range(3):
        _png(folder / f"{k}.png", (0, k * 50, 0))
    _bad_files(folder)
    meta = [{"file_name": f"{k}.png", "text": f"caption {k}"} for k in range(3)]
    meta += [{"file_name": "truncated.png", "text": "cut"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta))
    data = HFPairs(folder, EVAL, cache_dir=tmp_path / "cache")
    captions, ids, bad = _drain(_loader(data))
    assert sorted(captions) == ["caption 0", "caption 1", "caption 2"] and bad == 1
    with pytest.raises(UserError, match="not a Hugging Face datasets directory"):
        HFPairs(tmp_path / "saved" / "..", EVAL)


# ---------------------------------------------------------------- webdataset shards

def _tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def test_webdataset_shards_through_two_workers(tmp_path: Path) -> None:
    expected = []
    for shard in range(3):
        with tarfile.open(tmp_path / f"shard-{shard:03d}.tar", "w") as tar:
            for k in range(4):
                key, png = f"s{shard}_{k}", io.BytesIO()
                Image.new("L" if k == 1 else "RGB", (12, 12), 90).save(png, format="PNG")
                _tar_member(tar, f"{key}.png", png.getvalue() if (shard, k) != (2, 3) else b"broken")
                if k == 2:
                    meta = {"caption": f"c {key}", "image_id": 7}
                    _tar_member(tar, f"{key}.json", json.dumps(meta).encode())
                else:
                    _tar_member(tar, f"{key}.txt", f"c {key}".encode())
                if (shard, k) != (2, 3):
                    expected.append(f"c {key}")
    data = WebDatasetPairs(str(tmp_path / "shard-{000..002}.tar"), EVAL)
    assert len(data.urls) == 3
    captions, ids, bad = _drain(_loader(data))
    assert sorted(captions) == sorted(expected) and bad == 1  # each sample once, across 2 workers
    assert ids.count(7) == 3
    shuffled = WebDatasetPairs(str(tmp_path / "shard-{000..002}.tar"), EVAL, shuffle_buffer=8, seed=1)
    first, _, _ = _drain(_loader(shuffled, workers=0))
    again, _, _ = _drain(_loader(shuffled, workers=0))
    shuffled.set_epoch(1)
    other, _, _ = _drain(_loader(shuffled, workers=0))
    assert first == again and sorted(first) == sorted(other) == sorted(expected) and first != other
    with pytest.raises(UserError, match="shard not found"):
        WebDatasetPairs(str(tmp_path / "shard-{000..004}.tar"), EVAL)


# ---------------------------------------------------------------- synthetic pairs, registry, collate

def test_build_pretrain_dataset_dispatches_on_source(tmp_path: Path) -> None:
    assert {"synthetic", "json", "hf", "webdataset"} <= set(dataset_registry.names())
    data = build_pretrain_dataset(DataConfig(synthetic_train_size=30, synthetic_seed=2), EVAL, image_size=32)
    assert isinstance(data, SyntheticPairs) and len(data) == 30 and data.scenes.image_size == 32
    scenes = SyntheticScenes(30, seed=2, image_size=32)
    assert data[4]["caption"] == scenes.caption(4, 0) and data[4]["image_id"] == 4
    assert torch.allclose(data[4]["image"], EVAL(scenes.render(4)))
    data.set_epoch(3)
    assert [data[i]["caption"] for i in range(30)] == [scenes.caption(i, 3) for i in range(30)]
    with pytest.raises(ConfigError, match="data.source: unknown dataset 'jsn'.*did you mean 'json'"):
        build_pretrain_dataset(DataConfig(source="jsn"), EVAL, 32)
    with pytest.raises(ConfigError, match="data.train is empty"):
        build_pretrain_dataset(DataConfig(source="json"), EVAL, 32)
    _png(tmp_path / "x.png", (1, 1, 1))
    (tmp_path / "t.jsonl").write_text('{"image": "x.png", "caption": "hi"}\n')
    json_data = build_pretrain_dataset(DataConfig(source="json", train=str(tmp_path / "t.jsonl"),
                                                  image_root=str(tmp_path)), EVAL, 32)
    assert isinstance(json_data, JsonPairs) and len(json_data) == 1


def test_collator_pads_to_longest_and_drops_none() -> None:
    image = torch.zeros(3, 4, 4)
    samples = [{"image": image, "caption": "a b c", "image_id": 5}, None,
               {"image": image + 1, "caption": "a", "image_id": 6}]
    batch = Collator(WordTokenizer(), max_length=16)(samples)
    assert batch["input_ids"].shape == (2, 4) and batch["bad"] == 1
    assert batch["attention_mask"].sum(1).tolist() == [4, 2]
    assert batch["image_ids"].tolist() == [5, 6] and torch.equal(batch["images"][1], image + 1)
    assert Collator(WordTokenizer(), max_length=3)(samples)["input_ids"].shape == (2, 3)
    empty = Collator(WordTokenizer(), 16)([None, None])
    assert empty["bad"] == 2 and empty["images"].shape[0] == 0 and empty["image_ids"].numel() == 0


def test_seed_worker_seeds_python_and_numpy() -> None:
    torch.manual_seed(1234)
    seed_worker(0)
    assert random.random() == random.Random(1234).random()
    assert np.random.rand() == np.random.RandomState(1234).rand()


# ---------------------------------------------------------------- retrieval, VQA, zero-shot

def test_retrieval_split_from_file_and_synthetic(tmp_path: Path) -> None:
    for k in range(3):
        _png(tmp_path / f"{k}.png", (k * 70, 5, 5))
    lines = [{"image": "0.png", "caption": ["a", "b"]}, {"image": "1.png", "caption": "c"},
             {"image": "0.png", "caption": "d"}, {"image": "2.png", "caption": ["e", "f"]}]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    split = load_retrieval_split(tmp_path / "test.jsonl", tmp_path)
    assert split.num_images == 3 and split.captions == ["a", "b", "d", "c", "e", "f"]
    assert split.txt2img == [0, 0, 0, 1, 2, 2] and split.img2txt == [[0, 1, 2], [3], [4, 5]]
    assert split.load_image(1).getpixel((0, 0)) == (70, 5, 5)
    head = split.first(2)
    assert (head.num_images, head.captions) == (2, ["a", "b", "d", "c"])
    assert (head.txt2img, head.img2txt) == ([0, 0, 0, 1], [[0, 1, 2], [3]])
    batches = list(DataLoader(ImageDataset(split, EVAL), batch_size=2, num_workers=2))
    assert torch.cat([b["index"] for b in batches]).tolist() == [0, 1, 2]
    assert torch.allclose(batches[1]["image"][0], EVAL(Image.new("RGB", (20, 24), (140, 5, 5))))
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "nope.png", "caption": "x"}]))
    with pytest.raises(UserError, match="image not found: .*nope.png"):
        load_retrieval_split(tmp_path / "bad.json", tmp_path)
    scenes = SyntheticScenes(12, seed=0, split="test")
    synthetic = synthetic_retrieval_split(scenes)
    assert synthetic.num_images == 12 and len(synthetic.captions) == 60
    assert all(synthetic.txt2img[t] == i for i, texts in enumerate(synthetic.img2txt) for t in texts)
    assert synthetic.captions[5:10] == list(scenes.captions(1))


def test_vqa_loading_and_dataset(tmp_path: Path) -> None:
    _png(tmp_path / "q.png", (9, 9, 9))
    questions = [{"question_id": 1, "image": "q.png", "question": "what?", "answer": ["a"] * 10,
                  "answer_type": "other"},
                 {"question_id": 2, "image": "q.png", "question": "why?"}]
    (tmp_path / "vqa.json").write_text(json.dumps(questions))
    loaded = load_vqa(tmp_path / "vqa.json", tmp_path)
    assert [q["answer"] for q in loaded] == [["a"] * 10, []] and loaded[1]["image_id"] == 0
    data = VQADataset(loaded, open_image, EVAL)
    item = data[0]
    assert (item["question"], item["question_id"]) == ("what?", 1)
    assert (item["answers"], item["answer_type"]) == (["a"] * 10, "other")
    assert item["image"].shape == (3, SIZE, SIZE)
    for broken, message in (([{"question_id": 1, "image": "q.png"}], "entry 0: missing key 'question'"),
                            ([questions[0], questions[0]], "duplicate question_id 1"),
                            ([{**questions[0], "answer": [3]}], "'answer' must be a list of strings"),
                            ([{**questions[0], "image": "no.png"}], "image not found")):
        (tmp_path / "broken.json").write_text(json.dumps(broken))
        with pytest.raises(UserError, match=message):
            load_vqa(tmp_path / "broken.json", tmp_path)


def test_zeroshot_from_json_and_folder(tmp_path: Path) -> None:
    _png(tmp_path / "cats/1.png", (1, 0, 0))
    _png(tmp_path / "dogs/2.png", (2, 0, 0))
    _png(tmp_path / "dogs/3.png", (3, 0, 0))
    (tmp_path / "dogs/notes.txt").write_text("not an image")
    folder = load_zeroshot(tmp_path)
    assert folder.classes == ["cats", "dogs"] and folder.labels == [0, 1, 1] and folder.num_images == 3
    assert folder.load_image(2).getpixel((0, 0)) == (3, 0, 0)
    (tmp_path / "zs.json").write_text(json.dumps([{"image": "dogs/2.png", "label": "dog"},
                                                  {"image": "cats/1.png", "label": "cat"}]))
    (tmp_path / "classes.json").write_text(json.dumps(["bird", "cat", "dog"]))
    split = load_zeroshot(tmp_path / "zs.json", tmp_path, tmp_path / "classes.json")
    assert split.classes == ["bird", "cat", "dog"] and split.labels == [2, 1]
    (tmp_path / "classes.json").write_text(json.dumps(["cat"]))
    with pytest.raises(UserError, match="label 'dog' is not in the classes file"):
        load_zeroshot(tmp_path / "zs.json", tmp_path, tmp_path / "classes.json")

