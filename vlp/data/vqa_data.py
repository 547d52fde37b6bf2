"""VQA questions (files or synthetic), the VQA image dataset, and zero-shot classification splits."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from vlp.data.datasets import read_json_records
from vlp.data.retrieval_split import ImageFiles, check_images_exist
from vlp.data.synthetic import COLORS, SHAPES, SyntheticScenes
from vlp.data.transforms import ImageTransform
from vlp.errors import UserError

__all__ = ["load_vqa", "synthetic_vqa", "VQADataset", "ZeroShotSplit", "load_zeroshot", "synthetic_zeroshot"]

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _answers(value: Any, path: Path, location: str) -> list[str]:
    if value is None:
        return []
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise UserError(f"{path}: {location}: 'answer' must be a list of strings")
    return answers


def load_vqa(path: str | Path, image_root: str | Path) -> list[dict[str, Any]]:
    """A VQA JSON list (or JSONL) -> question dicts with ``question_id``, ``image`` (the resolved path),
    ``image_id`` (index of the image), ``question``, ``answer`` (human answers; [] when the file has none)
    and ``answer_type`` ("" when absent). Question ids must be unique and every image must exist."""
    path, root = Path(path), Path(image_root)
    questions: list[dict[str, Any]] = []
    image_ids: dict[str, int] = {}
    seen: set[Any] = set()
    for location, record in read_json_records(path):
        for key, kinds in (("question_id", (int, str)), ("image", (str,)), ("question", (str,))):
            if key not in record:
                raise UserError(f"{path}: {location}: missing key '{key}'")
            if not isinstance(record[key], kinds) or isinstance(record[key], bool):
                kind = type(record[key]).__name__
                raise UserError(f"{path}: {location}: '{key}' has the wrong type ({kind})")
        if record["question_id"] in seen:
            raise UserError(f"{path}: {location}: duplicate question_id {record['question_id']!r}")
        seen.add(record["question_id"])
        image = str(root / record["image"])
        questions.append({
            "question_id": record["question_id"], "image": image,
            "image_id": image_ids.setdefault(image, len(image_ids)), "question": record["question"],
            "answer": _answers(record.get("answer"), path, location),
            "answer_type": str(record.get("answer_type") or ""),
        })
    if not questions:
        raise UserError(f"{path}: no questions")
    check_images_exist([Path(p) for p in image_ids], path)
    return questions


def synthetic_vqa(scenes: SyntheticScenes) -> list[dict[str, Any]]:
    """All questions of the synthetic scenes; ``image`` is the scene index (load with ``scenes.render``)."""
    return [question for index in range(len(scenes)) for question in scenes.questions(index)]


class VQADataset(Dataset[dict[str, Any]]):
    """questions (from ``load_vqa``/``synthetic_vqa``) -> ``{"image" Tensor, "question", "question_id",
    "answers" (list, maybe empty), "answer_type"}``. ``image_loader`` maps a question's ``image`` to RGB:
    ``load_image_file`` for ``load_vqa`` questions, ``scenes.render`` for synthetic ones."""

    def __init__(self, questions: list[dict[str, Any]], image_loader: Callable[[Any], Image.Image],
                 transform: ImageTransform) -> None:
        self.questions = questions
        self.image_loader = image_loader
        self.transform = transform

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        question = self.questions[index]
        image = self.transform(self.image_loader(question["image"]))
        return {"image": image, "question": question["question"],
                "question_id": question["question_id"], "answers": list(question.get("answer") or []),
                "answer_type": question.get("answer_type", "")}


@dataclass
class ZeroShotSplit:
    """Images (``load_image(i)``, i < ``num_images``), their class indices and the class names."""

    load_image: Callable[[int], Image.Image]
    num_images: int
    labels: list[int]
    classes: list[str]
    image_paths: list[Path] | None = None


def _read_classes(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"classes file not found: {path}")
    try:
        classes = json.loads(path.read_bytes().decode("utf-8", errors="replace"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{path}: expected a non-empty JSON list of class names")
    if len(set(classes)) != len(classes):
        raise UserError(f"{path}: class names must be unique")
    return classes


def load_zeroshot(path: str | Path, image_root: str | Path = "",
                  classes_path: str | Path | None = None) -> ZeroShotSplit:
    """A JSON list of ``{"image", "label"}`` plus a classes file (JSON list; default: the sorted labels),
    or an image folder with one subfolder per class (classes = the subfolder names, sorted)."""
    path = Path(path)
    classes = None if classes_path is None else _read_classes(Path(classes_path))
    if path.is_dir():
        folders = sorted(p.name for p in path.iterdir() if p.is_dir())
        classes = classes or folders
        unknown = sorted(set(folders) - set(classes))
        if unknown:
            raise UserError(f"{path}: folder '{unknown[0]}' is not in the classes file")
        pairs = [(file, label) for label, name in enumerate(classes) if (path / name).is_dir()
                 for file in sorted((path / name).iterdir()) if file.suffix.lower() in _IMAGE_SUFFIXES]
        if not pairs:
            raise UserError(f"{path}: no images in class subfolders")
    else:
        records = read_json_records(path)
        for location, record in records:
            if not isinstance(record.get("image"), str) or not isinstance(record.get("label"), str):
                raise UserError(f"{path}: {location}: needs string keys 'image' and 'label'")
        classes = classes or sorted({record["label"] for _, record in records})
        index = {name: k for k, name in enumerate(classes)}
        for location, record in records:
            if record["label"] not in index:
                raise UserError(f"{path}: {location}: label '{record['label']}' is not in the classes file")
        pairs = [(Path(image_root) / record["image"], index[record["label"]]) for _, record in records]
        check_images_exist([p for p, _ in pairs], path)
    paths = [p for p, _ in pairs]
    return ZeroShotSplit(ImageFiles(paths), len(pairs), [label for _, label in pairs], list(classes), paths)


class _SceneSubset:
    def __init__(self, scenes: SyntheticScenes, indices: list[int]) -> None:
        self.scenes, self.indices = scenes, indices

    def __call__(self, index: int) -> Image.Image:
        return self.scenes.render(self.indices[index])


def synthetic_zeroshot(scenes: SyntheticScenes, attribute: str = "shape") -> ZeroShotSplit:
    """The single-object scenes labelled by their ``attribute`` ("shape" or "color")."""
    if attribute not in ("shape", "color"):
        raise ValueError(f"attribute must be 'shape' or 'color', got {attribute!r}")
    classes = list(SHAPES if attribute == "shape" else COLORS)
    indices = [i for i in range(len(scenes)) if len(scenes.objects(i)) == 1]
    labels = [classes.index(getattr(scenes.objects(i)[0], attribute)) for i in indices]
    return ZeroShotSplit(_SceneSubset(scenes, indices), len(indices), labels, classes)

