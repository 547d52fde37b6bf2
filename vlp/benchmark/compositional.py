"""Compositionality benchmarks from their released files: SugarCrepe, Winoground, ARO's VG-Relation and
VG-Attribution, and COCO/Flickr30k-Order.

Each loader reads the annotations once (checks every key and image file) into a ``PairTable``: the distinct
images (with ARO's bounding-box crops), the distinct captions and the (image, caption) pairs to score; the
evaluation scores the pairs with ITC and, for a fused model, ITM (``score_pairs``) and turns them into the
benchmark's own metrics. Every comparison is strict: a tie counts as a wrong answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlp.benchmark.files import ImageRefs, read_json, read_jsonl, read_name_list
from vlp.benchmark.scoring import choice_correct, group_accuracy, percent, score_pairs, winoground_scores
from vlp.benchmark.suite import OrderTask, SugarCrepeTask, TaskSpec, VGTask, WinogroundTask, required_path
from vlp.data.retrieval_split import check_images_exist
from vlp.errors import UserError

__all__ = ["PairTable", "load_sugarcrepe", "load_winoground", "load_vg", "load_order", "evaluate_selection"]

Box = tuple[float, float, float, float]


@dataclass
class PairTable:
    """Distinct images (path, optional crop box) and captions, the pairs to score, and per-example pair
    indices ``options[e]`` (what each benchmark compares)."""

    paths: list[Path] = field(default_factory=list)
    boxes: list[Box | None] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)
    _images: dict[tuple[Path, Box | None], int] = field(default_factory=dict)
    _texts: dict[str, int] = field(default_factory=dict)

    def pair(self, path: Path, caption: str, box: Box | None = None) -> int:
        image = self._images.setdefault((path, box), len(self._images))
        if image == len(self.paths):
            self.paths.append(path)
            self.boxes.append(box)
        text = self._texts.setdefault(caption, len(self._texts))
        if text == len(self.captions):
            self.captions.append(caption)
        self.pairs.append((image, text))
        return len(self.pairs) - 1

    def score(self, model: Any, transform: Any, spec: TaskSpec, device: Any, progress: bool) -> dict[str, Tensor]:
        index = torch.as_tensor(self.pairs, dtype=torch.long).reshape(-1, 2)
        return score_pairs(model, ImageRefs(self.paths, transform, self.boxes), self.captions, index[:, 0],
                           index[:, 1], spec.batch_size, spec.precision, device, progress, spec.num_workers)


@dataclass
class Selection:
    """A loaded benchmark: its pairs, ``options`` [e, o] pair indices, and how to read the scores."""

    kind: str  # sugarcrepe | winoground | vg | order
    table: PairTable
    options: Tensor  # [e, o]: pair index of each option (winoground: [e, 4] = c0i0, c0i1, c1i0, c1i1)
    groups: list[str]  # sugarcrepe: the category; vg: the relation / attribute pair; else ""
    true_option: int = 0
    min_count: int = 1
    exclude: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)


def _text(record: dict[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: needs a non-empty string '{key}'")
    return value


def load_sugarcrepe(name: str, spec: SugarCrepeTask) -> Selection:
    """SugarCrepe: ``DIR/<category>.json`` = {id: {filename, caption, negative_caption}}; images under
    ``image_root`` (COCO val2017)."""
    data = required_path(name, spec, "data", "directory")
    root = required_path(name, spec, "image_root", "directory")
    categories = list(spec.categories) or sorted(p.stem for p in data.glob("*.json"))
    if not categories:
        raise UserError(f"{data}: no SugarCrepe category files (*.json)")
    table, options, groups = PairTable(), [], []
    for category in categories:
        path = data / f"{category}.json"
        records = read_json(path)
        if not isinstance(records, dict) or not records:
            raise UserError(f"{path}: expected a non-empty JSON object of id -> {{filename, caption, "
                            "negative_caption}")
        for key, record in records.items():
            where = f"{path}: '{key}'"
            if not isinstance(record, dict):
                raise UserError(f"{where}: expected an object")
            image = root / _text(record, "filename", where)
            options.append([table.pair(image, _text(record, "caption", where)),
                            table.pair(image, _text(record, "negative_caption", where))])
            groups.append(category)
    check_images_exist(table.paths, data)
    return Selection("sugarcrepe", table, torch.as_tensor(options), groups, info={"categories": categories})


def load_winoground(name: str, spec: WinogroundTask) -> Selection:
    """Winoground: ``DIR/examples.jsonl`` ({id, image_0, image_1, caption_0, caption_1, ...}) and
    ``DIR/images/<image_k>.png``, read directly (no dataset script)."""
    data = required_path(name, spec, "data", "directory")
    path = data / "examples.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: not found (Winoground's examples.jsonl)")
    table, options = PairTable(), []
    for number, record in enumerate(read_jsonl(path), 1):
        where = f"{path}:{number}"
        images = []
        for key in ("image_0", "image_1"):
            stem = _text(record, key, where)
            image = data / "images" / stem
            images.append(image if image.suffix else image.with_name(stem + ".png"))
        captions = [_text(record, "caption_0", where), _text(record, "caption_1", where)]
        options.append([table.pair(images[i], captions[c]) for c in (0, 1) for i in (0, 1)])
    if not options:
        raise UserError(f"{path}: no examples")
    check_images_exist(table.paths, path)
    return Selection("winoground", table, torch.as_tensor(options), [""] * len(options))


def _box(record: dict[str, Any], where: str) -> Box:
    try:
        x, y, w, h = (float(record[k]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{where}: needs numbers bbox_x, bbox_y, bbox_w, bbox_h") from None
    if w <= 0 or h <= 0:
        raise UserError(f"{where}: empty bounding box ({w} x {h})")
    return (x, y, x + w, y + h)


def load_vg(name: str, spec: VGTask, attribution: bool) -> Selection:
    """ARO's VG-Relation / VG-Attribution: a JSON list of {image_path, bbox_x/y/w/h, true_caption,
    false_caption, relation_name | attributes}; each image is cropped to its box, as ARO does."""
    path = required_path(name, spec, "data", "file")
    root = required_path(name, spec, "image_root", "directory")
    records = read_json(path)
    if not isinstance(records, list) or not records:
        raise UserError(f"{path}: expected a non-empty JSON list")
    table, options, groups = PairTable(), [], []
    for number, record in enumerate(records):
        where = f"{path}: item {number}"
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected an object")
        image, box = root / _text(record, "image_path", where), _box(record, where)
        # the true caption first: option 0 is the answer
        options.append([table.pair(image, _text(record, "true_caption", where), box),
                        table.pair(image, _text(record, "false_caption", where), box)])
        if attribution:
            pair = record.get("attributes")
            if not isinstance(pair, list) or len(pair) != 2:
                raise UserError(f"{where}: needs 'attributes', a list of two")
            groups.append(f"{pair[0]}_{pair[1]}")
        else:
            groups.append(_text(record, "relation_name", where))
    check_images_exist(table.paths, path)
    exclude = tuple(read_name_list(required_path(name, spec, "exclude", "file"))) if spec.exclude else ()
    min_count = spec.min_count if spec.min_count >= 0 else (25 if attribution else 1)
    return Selection("vg", table, torch.as_tensor(options), groups, min_count=min_count, exclude=exclude)


def load_order(name: str, spec: OrderTask) -> Selection:
    """COCO-Order / Flickr30k-Order, pre-generated: [{image, caption_options: [true caption, perturbed...]}]."""
    path = required_path(name, spec, "data", "file")
    root = required_path(name, spec, "image_root", "directory")
    records = read_json(path)
    if not isinstance(records, list) or not records:
        raise UserError(f"{path}: expected a non-empty JSON list")
    table, options, width = PairTable(), [], None
    for number, record in enumerate(records):
        where = f"{path}: item {number}"
        captions = record.get("caption_options") if isinstance(record, dict) else None
        if not isinstance(captions, list) or len(captions) < 2 or not all(isinstance(c, str) for c in captions):
            raise UserError(f"{where}: needs 'caption_options', a list of at least two strings")
        if width is not None and len(captions) != width:
            raise UserError(f"{where}: {len(captions)} caption options; the first item has {width}")
        width = len(captions)
        image = root / _text(record, "image", where)
        options.append([table.pair(image, caption) for caption in captions])
    check_images_exist(table.paths, path)
    return Selection("order", table, torch.as_tensor(options), [""] * len(options))


def evaluate_selection(selection: Selection, model: Any, transform: Any, spec: TaskSpec, device: Any,
                       progress: bool) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics "<score>/<name>" in percent, details: per-group accuracies and counts)."""
    scores = selection.table.score(model, transform, spec, device, progress)
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {"examples": len(selection.options), "images": len(selection.table.paths),
                               "captions": len(selection.table.captions)}
    for score, values in scores.items():
        per_option = values[selection.options]  # [e, o]
        if selection.kind == "winoground":
            for metric, correct in winoground_scores(per_option.view(-1, 2, 2)).items():
                metrics[f"{score}/{metric}"] = percent(correct)
            continue
        correct = choice_correct(per_option, selection.true_option)
        if selection.kind == "sugarcrepe":
            _, per_group, _ = group_accuracy(correct, selection.groups)
            metrics.update({f"{score}/{group}": value for group, value in per_group.items()})
            metrics[f"{score}/mean"] = sum(per_group.values()) / len(per_group)
        elif selection.kind == "vg":
            macro, per_group, counted = group_accuracy(correct, selection.groups, selection.min_count,
                                                       selection.exclude)
            metrics[f"{score}/macro_accuracy"] = macro
            metrics[f"{score}/accuracy"] = percent(correct)
            details[f"{score}/per_group"] = per_group
            details["groups_counted"] = counted
            details["groups"] = len(set(selection.groups))
        else:
            metrics[f"{score}/accuracy"] = percent(correct)
    return metrics, details
