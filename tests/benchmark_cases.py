"""Tiny benchmark fixtures in each released format, written from synthetic scenes (a few images each), and a
tiny random fused checkpoint; shared by tests/test_benchmark_*.py."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlp.config import load_config
from vlp.data.synthetic import SyntheticScenes
from vlp.models import VLPModel, build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/pretrain/demo_tiny.yaml"  # albef_base_tiny: fused, ITM head, 32 px, synthetic tokenizer
SCENES = SyntheticScenes(12, seed=1, split="test", image_size=40)  # 40 px: the eval transform resizes to 32


def tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_model(load_config(TINY).model).eval()
    with torch.no_grad():  # a fresh init scores all pairs nearly alike: spread the scores beyond float noise
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    model.save_pretrained(directory)
    return directory


def load(directory: Path) -> tuple[VLPModel, Any]:
    model = VLPModel.from_pretrained(directory).eval()
    return model, model.image_transform(train=False)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(root: Path, count: int, prefix: str = "img") -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        names.append(f"{prefix}_{i}.png")
        SCENES.render(i).save(root / names[-1])
    return names


def write_karpathy(root: Path, count: int = 6) -> Path:
    names = write_images(root / "images", count)
    records = [{"image": f"images/{name}", "caption": list(SCENES.captions(i))[:3]} for i, name in enumerate(names)]
    (root / "test.json").write_text(json.dumps(records))
    return root / "test.json"


def write_wds(root: Path, samples: list[dict[str, Any]], shard_sizes: list[int], split: str = "test",
              dataset_type: str | None = None) -> Path:
    import webdataset as wds

    (root / split).mkdir(parents=True, exist_ok=True)
    assert sum(shard_sizes) == len(samples)
    start = 0
    for shard, size in enumerate(shard_sizes):
        with wds.TarWriter(str(root / split / f"{shard}.tar")) as sink:
            for sample in samples[start:start + size]:
                sink.write(sample)
        start += size
    (root / split / "nshards.txt").write_text(f"{len(shard_sizes)}\n")
    if dataset_type:
        (root / "dataset_type.txt").write_text(dataset_type + "\n")
    return root


def write_wds_retrieval(root: Path, count: int = 6) -> Path:
    samples = [{"__key__": f"s{i:07d}", "png": png(SCENES.render(i)), "txt": "\n".join(list(SCENES.captions(i))[:3])}
               for i in range(count)]
    return write_wds(root, samples, [4, count - 4], dataset_type="retrieval")


CLASSES = ["blue", "green", "red"]  # sorted, as ImageFolder numbers them
TEMPLATES = ["a small {c} circle in the center", "there is a large {c} square on the left"]


def labelled_images() -> list[tuple[int, Image.Image]]:
    """Two single-colour blocks per class on a grey background, each placed differently."""
    out = []
    for label, colour in enumerate(((50, 90, 235), (40, 180, 60), (220, 40, 40))):
        for k in range(2):
            image = Image.new("RGB", (40, 40), (40, 40, 40))
            image.paste(colour, (4 + 12 * k, 6, 20 + 12 * k, 30))
            out.append((label, image))
    return out


def write_imagefolder(root: Path) -> Path:
    for i, (label, image) in enumerate(labelled_images()):
        (root / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        image.save(root / CLASSES[label] / f"{i}.png")
    return root


def write_wds_classification(root: Path) -> Path:
    samples = [{"__key__": f"s{i:07d}", "png": png(image), "cls": label}
               for i, (label, image) in enumerate(labelled_images())]
    write_wds(root, samples, [2, 3, 1])
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root


def write_sugarcrepe(root: Path) -> tuple[Path, Path]:
    names = write_images(root / "coco", 6)
    for category, offset in (("swap_att", 0), ("replace_obj", 3)):
        records = {str(10 + k): {"filename": names[offset + k], "caption": SCENES.description(offset + k),
                                 "negative_caption": SCENES.description((offset + k + 1) % 6)} for k in range(3)}
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "data" / f"{category}.json").write_text(json.dumps(records))
    return root / "data", root / "coco"


def write_winoground(root: Path, count: int = 3) -> Path:
    write_images(root / "images", 2 * count, prefix="raw")
    lines = []
    for e in range(count):
        for k in (0, 1):
            (root / "images" / f"raw_{2 * e + k}.png").rename(root / "images" / f"ex_{e}_img_{k}.png")
        lines.append(json.dumps({"id": e, "caption_0": SCENES.description(2 * e), "caption_1": SCENES.description(2 * e + 1),
                                 "image_0": f"ex_{e}_img_0", "image_1": f"ex_{e}_img_1", "tag": "Object"}))
    (root / "examples.jsonl").write_text("\n".join(lines) + "\n")
    return root


def write_vg(root: Path, attribution: bool) -> tuple[Path, Path]:
    names = write_images(root / "images", 4)
    records = []
    for i in range(8):
        record: dict[str, Any] = {"image_path": names[i % 4], "bbox_x": 2 + i, "bbox_y": 4, "bbox_w": 20 + i, "bbox_h": 26,
                                  "true_caption": SCENES.description(i % 4), "false_caption": SCENES.description((i + 1) % 4)}
        if attribution:
            record["attributes"] = ["red", "blue"] if i < 5 else ["small", "large"]
        else:
            record["relation_name"] = "on" if i < 3 else ("under" if i < 7 else "near")
        records.append(record)
    path = root / ("visual_genome_attribution.json" if attribution else "visual_genome_relation.json")
    path.write_text(json.dumps(records))
    return path, root / "images"


def write_order(root: Path) -> tuple[Path, Path]:
    names = write_images(root / "images", 4)
    records = [{"image": names[i], "caption_options": [SCENES.description(i)] + [SCENES.description((i + d) % 4)
                                                                               for d in (1, 2, 3)]} for i in range(4)]
    (root / "order.json").write_text(json.dumps(records))
    return root / "order.json", root / "images"
