"""The embedded synthetic dataset: shapes on a 3x3 grid, captions that fully describe them, VQA questions.

Scene specs are generated up front from a seed (cheap: 20k specs take a fraction of a second); images,
captions and questions are built on demand from the spec, so the in-memory dataset costs no pixels.
The description space is split by a hash of the canonical description: a test scene's description
never occurs in train, whatever the split sizes or seeds, and test descriptions are unique, so
retrieval ground truth is well defined.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from vlp.errors import UserError

__all__ = [
    "COLORS",
    "SHAPES",
    "SIZES",
    "POSITIONS",
    "SYNTHETIC_WORDS",
    "ZEROSHOT_TEMPLATES",
    "SceneObject",
    "Scene",
    "SyntheticScenes",
    "class_caption",
    "write_synthetic",
]

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)
_POSITION_PHRASES = (
    "at the top left", "at the top", "at the top right", "on the left", "in the center", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)
_RGB = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (240, 240, 240),
}
BACKGROUND = (40, 40, 40)
_SIZE_FRACTION = (0.45, 0.8)  # side of the object / side of its grid cell, per SIZES entry
_JITTER = 0.7  # fraction of the free room in the cell the object may move by
_MAX_OBJECTS = 3
_NUM_CAPTIONS = 5
_TEST_BUCKETS = 8  # 1 in 8 descriptions is reserved for the test split
_COUNT_WORDS = ("one", "two", "three")
_COUNT_ANSWERS = ("1", "2", "3", "4")
_QUESTIONS_PER_IMAGE = 8  # question_id = image index * this + question number

# Prompt ensembles in the captions' own phrasing (CLIP averages 80 templates for ImageNet): every caption
# names size, color and position, so a class prompt is averaged over the attributes it does not name.
ZEROSHOT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "shape": tuple(f"one shape: a {size} {color} {{}} {where}"
                   for size in SIZES for color in COLORS for where in _POSITION_PHRASES),
    "color": tuple(f"one shape: a {size} {{}} {shape} {where}"
                   for size in SIZES for shape in SHAPES for where in _POSITION_PHRASES),
}

# (cell, color, shape, size) indices; a scene keeps its objects sorted by cell, which makes it canonical.
_ObjectSpec = tuple[int, int, int, int]
_SceneSpec = tuple[tuple[_ObjectSpec, ...], tuple[tuple[float, float], ...]]


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    size: str
    position: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels; x1 and y1 exclusive

    @property
    def noun(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"

    @property
    def position_phrase(self) -> str:
        return _POSITION_PHRASES[POSITIONS.index(self.position)]


@dataclass(frozen=True)
class Scene:
    index: int
    objects: tuple[SceneObject, ...]  # sorted by grid cell
    description: str  # canonical: identifies the scene's set of objects
    captions: tuple[str, ...]
    questions: tuple[dict[str, Any], ...]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _caption(template: int, objects: list[SceneObject]) -> str:
    described = [f"{o.noun} {o.position_phrase}" for o in objects]
    if template == 0:
        return _join(described)
    if template == 1:
        return "there is " + _join(described)
    if template == 2:
        n = len(objects)
        return f"{_COUNT_WORDS[n - 1]} {'shape' if n == 1 else 'shapes'}: " + _join(described)
    if template == 3:
        return "a picture of " + _join(described)
    if template == 4:
        return "an image with " + _join(described)
    return _join([f"{o.position_phrase} there is {o.noun}" for o in objects])


_NUM_TEMPLATES = 6


def _words() -> list[str]:
    # every word the templates and questions use (tests check it covers all generated text)
    texts = ["there is a picture of an image with shape shapes : , and ?", " ".join(_COUNT_WORDS)]
    texts += [" ".join(COLORS), " ".join(SHAPES), " ".join(SIZES), " ".join(_POSITION_PHRASES)]
    texts += ["how many shapes are there what color is the what shape is where is the what size yes no"]
    texts += [" ".join(_COUNT_ANSWERS)]
    return sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text)})


SYNTHETIC_WORDS: list[str] = _words()


def _bucket(objects: tuple[_ObjectSpec, ...]) -> int:
    return zlib.crc32(bytes(v for obj in objects for v in obj)) % _TEST_BUCKETS


def _generate(size: int, seed: int, split: str, single_objects: bool = False) -> list[_SceneSpec]:
    rng = random.Random(f"vlp-synthetic:{seed}:{split}" + (":single" if single_objects else ""))
    test = split == "test"
    unique = test and not single_objects
    seen: set[tuple[_ObjectSpec, ...]] = set()
    specs: list[_SceneSpec] = []
    for _ in range(100 * size + 1000):
        if len(specs) == size:
            return specs
        count = 1 if single_objects else rng.randint(1, _MAX_OBJECTS)
        cells = sorted(rng.sample(range(9), count))
        objects = tuple(
            (cell, rng.randrange(len(COLORS)), rng.randrange(len(SHAPES)), rng.randrange(len(SIZES)))
            for cell in cells
        )
        if (_bucket(objects) == 0) != test or (unique and objects in seen):
            continue
        seen.add(objects)
        jitter = tuple((rng.uniform(-_JITTER, _JITTER), rng.uniform(-_JITTER, _JITTER)) for _ in cells)
        specs.append((objects, jitter))
    if len(specs) == size:
        return specs
    raise UserError(f"cannot draw {size} distinct synthetic {split} scenes; use a smaller size")


def _box(cell: int, size: int, jitter: tuple[float, float], image_size: int) -> tuple[int, int, int, int]:
    row, col = divmod(cell, 3)
    # integer cell edges: neighbouring cells share no pixel, so objects never overlap
    x_edge0, x_edge1 = round(col * image_size / 3), round((col + 1) * image_size / 3)
    y_edge0, y_edge1 = round(row * image_size / 3), round((row + 1) * image_size / 3)
    cell_side = min(x_edge1 - x_edge0, y_edge1 - y_edge0)
    side = max(2, min(cell_side, round(cell_side * _SIZE_FRACTION[size])))
    x0 = x_edge0 + round((x_edge1 - x_edge0 - side) * (1 + jitter[0]) / 2)
    y0 = y_edge0 + round((y_edge1 - y_edge0 - side) * (1 + jitter[1]) / 2)
    return x0, y0, x0 + side, y0 + side


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int],
          fill: tuple[int, ...]) -> None:
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1  # PIL coordinates are inclusive
    mid_x, mid_y = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (mid_x, y0)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(mid_x, y0), (x1, mid_y), (mid_x, y1), (x0, mid_y)], fill=fill)
    else:  # cross: a plus sign whose bars are a third of the side thick
        side = box[2] - box[0]
        thick = max(1, round(side / 3))
        start = (side - thick) // 2
        draw.rectangle((x0, y0 + start, x1, y0 + start + thick - 1), fill=fill)
        draw.rectangle((x0 + start, y0, x0 + start + thick - 1, y1), fill=fill)


def _answers(rng: random.Random, truth: str, choices: tuple[str, ...]) -> list[str]:
    """Ten human answers: mostly the truth, 0-3 annotators pick another valid answer (soft scores matter)."""
    wrong = [c for c in choices if c != truth]
    noisy = rng.choice((0, 1, 1, 2, 2, 3))
    answers = [truth] * (10 - noisy) + [rng.choice(wrong) for _ in range(noisy)]
    rng.shuffle(answers)
    return answers


def class_caption(objects: tuple[SceneObject, ...] | list[SceneObject]) -> str:
    """A class-level caption, true of the scene but shared by many scenes, as web alt-texts are: the colour and
    shape of a single object ("a red circle"), else only the count ("two shapes")."""
    if len(objects) == 1:
        return f"{_article(objects[0].color)} {objects[0].color} {objects[0].shape}"
    return f"{_COUNT_WORDS[len(objects) - 1]} shapes"


class SyntheticScenes:
    """``size`` scenes of one split ("train" or "test") drawn from ``seed``, rendered at ``image_size`` px.

    ``repeated_captions`` (train split only): the fraction of images whose captions are all one class-level
    caption (``class_caption``) that repeats across images, instead of full descriptions: data on which
    ITM negatives mined from the contrastive similarities are often the same text of another image.
    ``single_objects``: every scene holds one object and test descriptions may repeat (the test split has
    only ~80 distinct single-object descriptions): a zero-shot classification set of any size whose
    descriptions still never occur in train."""

    def __init__(self, size: int, seed: int = 0, split: str = "train", image_size: int = 64,
                 repeated_captions: float = 0.0, single_objects: bool = False) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if size < 0 or image_size < 12:
            raise UserError(f"synthetic data needs size >= 0 and image_size >= 12, "
                            f"got {size} and {image_size}")
        if not 0.0 <= repeated_captions <= 1.0:
            raise UserError(f"synthetic repeated_captions must be in [0, 1], got {repeated_captions}")
        self.size, self.seed, self.split, self.image_size = size, seed, split, image_size
        self.repeated_captions = repeated_captions if split == "train" else 0.0
        self.num_captions = _NUM_CAPTIONS
        self._specs = _generate(size, seed, split, single_objects)

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int, purpose: str) -> random.Random:
        return random.Random(f"{self.seed}:{self.split}:{index}:{purpose}")

    def objects(self, index: int) -> tuple[SceneObject, ...]:
        specs, jitter = self._specs[index]
        return tuple(
            SceneObject(COLORS[color], SHAPES[shape], SIZES[size], POSITIONS[cell],
                        _box(cell, size, offset, self.image_size))
            for (cell, color, shape, size), offset in zip(specs, jitter)
        )

    def description(self, index: int) -> str:
        return _caption(0, list(self.objects(index)))

    def has_class_caption(self, index: int) -> bool:
        """Whether this image is captioned by its repeated class-level caption (see ``repeated_captions``)."""
        return self.repeated_captions > 0 and self._rng(index, "repeated").random() < self.repeated_captions

    def captions(self, index: int) -> tuple[str, ...]:
        if self.has_class_caption(index):
            return (class_caption(self.objects(index)),) * self.num_captions
        rng = self._rng(index, "captions")
        objects = list(self.objects(index))
        return tuple(_caption(t, rng.sample(objects, len(objects)))
                     for t in rng.sample(range(_NUM_TEMPLATES), self.num_captions))

    def caption(self, index: int, epoch: int) -> str:
        """One paraphrase (template and object order) chosen from (index, epoch): a new one every epoch."""
        if self.has_class_caption(index):
            return class_caption(self.objects(index))
        rng = self._rng(index, f"epoch{epoch}")
        objects = list(self.objects(index))
        return _caption(rng.randrange(_NUM_TEMPLATES), rng.sample(objects, len(objects)))

    def questions(self, index: int) -> tuple[dict[str, Any], ...]:
        rng = self._rng(index, "questions")
        objects = self.objects(index)
        shapes = [o.shape for o in objects]
        kinds = [(o.color, o.shape) for o in objects]
        asked: list[tuple[str, str, str, tuple[str, ...]]] = [
            ("how many shapes are there?", str(len(objects)), "number", _COUNT_ANSWERS)]
        unique_shape = [o for o in objects if shapes.count(o.shape) == 1]
        if unique_shape:
            obj = rng.choice(unique_shape)
            asked.append((f"what color is the {obj.shape}?", obj.color, "other", COLORS))
        obj = rng.choice(objects)
        asked.append((f"what shape is {obj.position_phrase}?", obj.shape, "other", SHAPES))
        unique_kind = [o for o in objects if kinds.count((o.color, o.shape)) == 1]
        if unique_kind:
            obj = rng.choice(unique_kind)
            asked.append((f"where is the {obj.color} {obj.shape}?", obj.position, "other", POSITIONS))
            obj = rng.choice(unique_kind)
            asked.append((f"what size is the {obj.color} {obj.shape}?", obj.size, "other", SIZES))
        obj = rng.choice(objects)
        asked.append((f"is there {_article(obj.color)} {obj.color} {obj.shape}?", "yes", "yes/no",
                      ("yes", "no")))
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in kinds]
        color, shape = rng.choice(absent)
        asked.append((f"is there {_article(color)} {color} {shape}?", "no", "yes/no", ("yes", "no")))
        return tuple(
            {"question_id": index * _QUESTIONS_PER_IMAGE + k, "image": index, "image_id": index,
             "question": question, "answer": _answers(rng, truth, choices), "answer_type": answer_type}
            for k, (question, truth, answer_type, choices) in enumerate(asked)
        )

    def scene(self, index: int) -> Scene:
        return Scene(index, self.objects(index), self.description(index), self.captions(index),
                     self.questions(index))

    def render(self, index: int) -> Image.Image:
        image = Image.new("RGB", (self.image_size, self.image_size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for obj in self.objects(index):
            _draw(draw, obj.shape, obj.box, _RGB[obj.color])
        return image


def _image_path(split: str, index: int) -> str:
    return f"images/{split}/{index:06d}.png"


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=None, separators=(",", ":")) + "\n")


def write_synthetic(out_dir: str | Path, train_size: int = 20000, test_size: int = 1000, seed: int = 0,
                    image_size: int = 64, repeated_captions: float = 0.0) -> dict[str, Path]:
    """Write the synthetic dataset in vlp's file formats; image paths in the files are relative to
    ``out_dir``.

    ``repeated_captions``: see ``SyntheticScenes`` (the training captions only).
    train.jsonl has one caption per line (several lines per image, ``image_id`` set), test.json is Karpathy
    style (``caption`` a list), vqa_*.json hold 10 answers per question, zeroshot.json labels the
    single-object test scenes by shape (classes.json), boxes.json lists every object's pixel box.
    """
    root = Path(out_dir)
    splits = {"train": SyntheticScenes(train_size, seed, "train", image_size, repeated_captions),
              "test": SyntheticScenes(test_size, seed, "test", image_size)}
    boxes: list[dict[str, Any]] = []
    vqa: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    zeroshot: list[dict[str, str]] = []
    test_pairs: list[dict[str, Any]] = []
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "train.jsonl", "w") as train_file:
        for split, scenes in splits.items():
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            for index in range(len(scenes)):
                scene, image = scenes.scene(index), _image_path(split, index)
                scenes.render(index).save(root / image)
                boxes.append({"image": image, "objects": [
                    {"color": o.color, "shape": o.shape, "size": o.size, "position": o.position,
                     "box": list(o.box)}
                    for o in scene.objects]})
                vqa[split] += [{**{k: v for k, v in q.items() if k != "image_id"}, "image": image}
                               for q in scene.questions]
                if split == "train":
                    train_file.writelines(json.dumps({"image": image, "caption": c, "image_id": index}) + "\n"
                                          for c in scene.captions)
                    continue
                test_pairs.append({"image": image, "caption": list(scene.captions), "image_id": index})
                if len(scene.objects) == 1:
                    zeroshot.append({"image": image, "label": scene.objects[0].shape})
    files = {"root": root, "train": root / "train.jsonl", "test": root / "test.json",
             "vqa_train": root / "vqa_train.json", "vqa_test": root / "vqa_test.json",
             "zeroshot": root / "zeroshot.json", "classes": root / "classes.json",
             "boxes": root / "boxes.json"}
    _write_json(files["test"], test_pairs)
    _write_json(files["vqa_train"], vqa["train"])
    _write_json(files["vqa_test"], vqa["test"])
    _write_json(files["zeroshot"], zeroshot)
    _write_json(files["classes"], list(SHAPES))
    _write_json(files["boxes"], boxes)
    return files
