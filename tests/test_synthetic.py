"""vlp.data.synthetic: determinism, split disjointness, captions that describe the scene, boxes that match
the pixels, VQA answers derived independently from the scene, and the files write_synthetic produces."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlp.data.datasets import JsonPairs
from vlp.data.retrieval_split import load_retrieval_split
from vlp.data.synthetic import (
    BACKGROUND,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    SYNTHETIC_WORDS,
    SceneObject,
    SyntheticScenes,
    write_synthetic,
)
from vlp.data.transforms import eval_transform
from vlp.data.vqa_data import load_vqa, load_zeroshot, synthetic_vqa, synthetic_zeroshot

RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40),
       "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (240, 240, 240)}
PHRASES = ["at the top left", "at the top right", "at the bottom left", "at the bottom right", "at the top",
           "at the bottom", "on the left", "on the right", "in the center"]  # longest first for the regex
PHRASE_TO_POSITION = {p: p.split(" ", 2)[2] for p in PHRASES}  # "on the left" -> "left"
POS = "|".join(PHRASES)
NOUN = rf"an? ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
OBJECT_RE = re.compile(rf"(?:({POS}) there is {NOUN})|(?:{NOUN} ({POS}))")


def parse_caption(caption: str) -> set[tuple[str, str, str, str]]:
    """An independent reading of a caption: the set of (size, color, shape, position) it states."""
    found = set()
    for m in OBJECT_RE.finditer(caption):
        if m.group(1):
            found.add((m.group(2), m.group(3), m.group(4), PHRASE_TO_POSITION[m.group(1)]))
        else:
            found.add((m.group(5), m.group(6), m.group(7), PHRASE_TO_POSITION[m.group(8)]))
    return found


def as_set(objects: tuple[SceneObject, ...]) -> set[tuple[str, str, str, str]]:
    return {(o.size, o.color, o.shape, o.position) for o in objects}


def test_position_phrases_map_to_positions() -> None:
    assert sorted(PHRASE_TO_POSITION.values()) == sorted(POSITIONS)


def test_same_seed_same_scenes_captions_pixels_other_seed_differs() -> None:
    a, b = SyntheticScenes(40, seed=3, split="train"), SyntheticScenes(40, seed=3, split="train")
    c = SyntheticScenes(40, seed=4, split="train")
    for i in range(40):
        assert a.scene(i) == b.scene(i)
        assert a.caption(i, 7) == b.caption(i, 7)
        assert np.array_equal(np.asarray(a.render(i)), np.asarray(b.render(i)))
    same = sum(a.description(i) == c.description(i) for i in range(40))
    assert same <= 2
    assert any(not np.array_equal(np.asarray(a.render(i)), np.asarray(c.render(i))) for i in range(40))


def test_test_split_unique_and_disjoint_from_train() -> None:
    train = SyntheticScenes(20000, seed=0, split="train")  # also the "20k specs are cheap" check
    assert len(train) == 20000
    train_descriptions = {train.description(i) for i in range(len(train))}
    for seed in (0, 1):
        test = SyntheticScenes(1000, seed=seed, split="test")
        descriptions = [test.description(i) for i in range(len(test))]
        assert len(set(descriptions)) == 1000
        assert not set(descriptions) & train_descriptions
    counts = Counter(len(train.objects(i)) for i in range(len(train)))
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 5000


def test_captions_fully_describe_the_scene() -> None:
    for split in ("train", "test"):
        scenes = SyntheticScenes(150, seed=1, split=split)
        for i in range(len(scenes)):
            scene = scenes.scene(i)
            truth = as_set(scene.objects)
            assert len({o.position for o in scene.objects}) == len(scene.objects)  # distinct cells
            assert len(scene.captions) == 5 and len(set(scene.captions)) == 5
            for caption in [*scene.captions, scene.description, scenes.caption(i, 0), scenes.caption(i, 1)]:
                assert parse_caption(caption) == truth, caption
    scenes = SyntheticScenes(100, seed=1)
    # a new paraphrase per epoch
    assert sum(scenes.caption(i, 0) != scenes.caption(i, 1) for i in range(100)) > 60


def test_words_cover_every_caption_question_and_answer() -> None:
    scenes = SyntheticScenes(200, seed=2, split="test")
    texts = [c for i in range(200) for c in scenes.captions(i)]
    texts += [q["question"] + " " + " ".join(q["answer"]) for q in synthetic_vqa(scenes)]
    used = {w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)}
    assert used <= set(SYNTHETIC_WORDS)
    assert len(SYNTHETIC_WORDS) == len(set(SYNTHETIC_WORDS))


@pytest.mark.parametrize("image_size", [64, 32])
def test_boxes_match_rendered_pixels(image_size: int) -> None:
    scenes = SyntheticScenes(120, seed=5, split="train", image_size=image_size)
    for i in range(len(scenes)):
        pixels = np.asarray(scenes.render(i)).astype(int)
        assert pixels.shape == (image_size, image_size, 3)
        covered = np.zeros(pixels.shape[:2], dtype=bool)
        for obj in scenes.objects(i):
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size
            assert x1 - x0 == y1 - y0
            region = pixels[y0:y1, x0:x1]
            colored = (region == RGB[obj.color]).all(-1)
            assert colored.mean() > 0.3  # the box is filled by the object's colour
            ys, xs = np.nonzero(colored)
            # the object's pixels touch every side of its box (the box is tight)
            assert (ys.min(), xs.min(), ys.max(), xs.max()) == (0, 0, y1 - y0 - 1, x1 - x0 - 1)
            assert not covered[y0:y1, x0:x1].any()  # boxes never overlap
            covered[y0:y1, x0:x1] = True
        foreground = (pixels != BACKGROUND).any(-1)
        assert not (foreground & ~covered).any()  # nothing is drawn outside the boxes


def _expected_answer(question: str, objects: tuple[SceneObject, ...]) -> tuple[str, str]:
    if question == "how many shapes are there?":
        return str(len(objects)), "number"
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        (obj,) = [o for o in objects if o.shape == m.group(1)]
        return obj.color, "other"
    if m := re.fullmatch(r"what shape is (.+)\?", question):
        (obj,) = [o for o in objects if o.position == PHRASE_TO_POSITION[m.group(1)]]
        return obj.shape, "other"
    if m := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
        (obj,) = [o for o in objects if (o.color, o.shape) == m.groups()]
        return obj.position, "other"
    if m := re.fullmatch(r"what size is the (\w+) (\w+)\?", question):
        (obj,) = [o for o in objects if (o.color, o.shape) == m.groups()]
        return obj.size, "other"
    m = re.fullmatch(r"is there an? (\w+) (\w+)\?", question)
    assert m is not None, question
    return ("yes" if any((o.color, o.shape) == m.groups() for o in objects) else "no"), "yes/no"


def test_vqa_answers_are_right_by_majority_and_noisy() -> None:
    scenes = SyntheticScenes(300, seed=6, split="test")
    questions = synthetic_vqa(scenes)
    assert len({q["question_id"] for q in questions}) == len(questions)
    kinds: Counter[str] = Counter()
    unanimous = 0
    for q in questions:
        truth, answer_type = _expected_answer(q["question"], scenes.objects(q["image"]))
        assert len(q["answer"]) == 10
        majority, votes = Counter(q["answer"]).most_common(1)[0]
        assert (majority, q["answer_type"]) == (truth, answer_type)
        assert votes >= 7
        unanimous += votes == 10
        kinds[q["answer_type"]] += 1
    assert set(kinds) == {"yes/no", "number", "other"}
    assert 0.1 < unanimous / len(questions) < 0.5  # some annotators disagree: soft scores matter
    yes_no = [Counter(q["answer"]).most_common(1)[0][0] for q in questions if q["answer_type"] == "yes/no"]
    assert yes_no.count("yes") == yes_no.count("no")


def test_zeroshot_labels_single_object_scenes() -> None:
    scenes = SyntheticScenes(400, seed=0, split="test")
    for attribute, classes in (("shape", SHAPES), ("color", COLORS)):
        split = synthetic_zeroshot(scenes, attribute)
        assert split.classes == list(classes) and split.num_images == len(split.labels) > 20
        singles = [i for i in range(400) if len(scenes.objects(i)) == 1]
        for k in (0, split.num_images - 1):
            (obj,) = scenes.objects(singles[k])
            assert split.classes[split.labels[k]] == getattr(obj, attribute)
            assert np.array_equal(np.asarray(split.load_image(k)), np.asarray(scenes.render(singles[k])))


def test_write_synthetic_files_and_formats(tmp_path: Path) -> None:
    files = write_synthetic(tmp_path, train_size=6, test_size=40, seed=0, image_size=32)
    for name in ("train", "test", "vqa_train", "vqa_test", "zeroshot", "classes", "boxes"):
        assert files[name].is_file(), name
    train_lines = [json.loads(line) for line in files["train"].read_text().splitlines()]
    assert len(train_lines) == 6 * 5
    assert all(set(r) == {"image", "caption", "image_id"} for r in train_lines)
    assert all(isinstance(r["caption"], str) for r in train_lines)
    assert Counter(r["image_id"] for r in train_lines) == {i: 5 for i in range(6)}
    test = json.loads(files["test"].read_text())
    scenes = SyntheticScenes(40, seed=0, split="test", image_size=32)
    assert [r["image_id"] for r in test] == list(range(40))
    for record in test:
        assert isinstance(record["caption"], list) and len(record["caption"]) == 5
        assert record["caption"] == list(scenes.captions(record["image_id"]))
        image = Image.open(tmp_path / record["image"])
        assert image.size == (32, 32)
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(scenes.render(record["image_id"])))
    for name in ("vqa_train", "vqa_test"):
        vqa = json.loads(files[name].read_text())
        keys = {"question_id", "image", "question", "answer", "answer_type"}
        assert vqa and all(set(q) == keys for q in vqa)
        assert all(len(q["answer"]) == 10 and (tmp_path / q["image"]).is_file() for q in vqa)
    classes = json.loads(files["classes"].read_text())
    zeroshot = json.loads(files["zeroshot"].read_text())
    assert classes == list(SHAPES)
    assert len(zeroshot) == sum(len(scenes.objects(i)) == 1 for i in range(40)) > 0
    assert all(r["label"] in classes for r in zeroshot)
    boxes = json.loads(files["boxes"].read_text())
    assert len(boxes) == 46 and boxes[6]["image"] == test[0]["image"]
    assert [tuple(o["box"]) for o in boxes[6]["objects"]] == [o.box for o in scenes.objects(0)]
    # the vlp loaders read every file back
    transform = eval_transform(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    pairs = JsonPairs(files["train"], tmp_path, transform)
    assert len(pairs) == 30 and all(pairs[i] is not None for i in range(0, 30, 7))
    retrieval = load_retrieval_split(files["test"], tmp_path)
    assert (retrieval.num_images, len(retrieval.captions)) == (40, 200)
    assert len(load_vqa(files["vqa_test"], tmp_path)) == len(json.loads(files["vqa_test"].read_text()))
    assert load_zeroshot(files["zeroshot"], tmp_path, files["classes"]).num_images == len(zeroshot)


def test_repeated_class_captions_repeat_across_images_and_stay_true() -> None:
    from vlp.data.synthetic import class_caption

    scenes = SyntheticScenes(400, seed=0, split="train", repeated_captions=0.5)
    chosen = [i for i in range(400) if scenes.has_class_caption(i)]
    assert 140 < len(chosen) < 260  # about half
    captions = [scenes.caption(i, epoch=0) for i in chosen]
    assert len(set(captions)) < len(captions) / 4  # a few dozen strings for ~200 images
    for index in chosen:
        objects = scenes.objects(index)
        assert scenes.captions(index) == (class_caption(objects),) * scenes.num_captions
        assert scenes.caption(index, epoch=3) == class_caption(objects)
        if len(objects) == 1:
            assert objects[0].color in class_caption(objects) and objects[0].shape in class_caption(objects)
    others = [i for i in range(400) if not scenes.has_class_caption(i)]
    assert all(scenes.caption(i, 0) != class_caption(scenes.objects(i)) for i in others)
    # the test split keeps full, unique descriptions
    test = SyntheticScenes(50, seed=0, split="test", repeated_captions=0.5)
    assert not any(test.has_class_caption(i) for i in range(50))
