"""Every benchmark format read from tiny fixtures written here, each metric checked against a brute-force
reference computed pair by pair with the model's own encode_image / encode_text / itm_logits."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image

from tests.benchmark_cases import (
    CLASSES,
    TEMPLATES,
    labelled_images,
    load,
    tiny_checkpoint,
    write_imagefolder,
    write_karpathy,
    write_order,
    write_sugarcrepe,
    write_vg,
    write_wds_classification,
    write_wds_retrieval,
    write_winoground,
)
from vlp.benchmark import load_suite, run_suite
from vlp.benchmark.suite import TASK_TYPES
from vlp.config.schema import EvalConfig
from vlp.data.retrieval_split import load_retrieval_split
from vlp.eval.retrieval import evaluate_retrieval
from vlp.eval.zeroshot import evaluate_zeroshot


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def run(tmp_path: Path, checkpoint: Path, tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(json.dumps({"name": "t", "defaults": {"batch_size": 4}, "tasks": tasks}))
    result = run_suite(load_suite(suite_file), [checkpoint], tmp_path / "out", device="cpu", progress=False)
    assert result.failed == []
    return {name: entry["runs"]["tiny"] for name, entry in result.results["tasks"].items()}


@torch.no_grad()
def image_emb(model: Any, transform: Any, image: Image.Image) -> torch.Tensor:
    return model.encode_image(transform(image)[None])[0]


@torch.no_grad()
def text_emb(model: Any, text: str) -> torch.Tensor:
    batch = model.tokenizer([text], max_length=model.config.text.max_length)
    return model.encode_text(batch["input_ids"], batch["attention_mask"])[0]


@torch.no_grad()
def itm(model: Any, transform: Any, image: Image.Image, text: str) -> float:
    batch = model.tokenizer([text], max_length=model.config.text.max_length)
    logits = model.itm_logits(transform(image)[None], batch["input_ids"], batch["attention_mask"])[0]
    return float(logits[1] - logits[0])  # the log-odds, vlp's match score


def pair_score(model: Any, transform: Any, image: Image.Image, text: str, score: str) -> float:
    if score == "itc":
        return float(image_emb(model, transform, image) @ text_emb(model, text))
    return itm(model, transform, image, text)


# ------------------------------------------------------------------------------------------ retrieval
def test_retrieval_karpathy_and_wds_match_brute_force_and_evaluate_retrieval(checkpoint: Path,
                                                                             tmp_path: Path) -> None:
    data = write_karpathy(tmp_path / "flickr")
    wds_root = write_wds_retrieval(tmp_path / "wds_flickr")
    out = run(tmp_path, checkpoint, {
        "karpathy": {"type": "retrieval", "data": str(data), "image_root": str(data.parent), "k_test": 3},
        "wds": {"type": "retrieval", "format": "wds", "data": str(wds_root), "k_test": 3}})
    model, transform = load(checkpoint)
    records = json.loads(data.read_text())
    images = [Image.open(data.parent / r["image"]).convert("RGB") for r in records]
    captions = [(i, c) for i, r in enumerate(records) for c in r["caption"]]
    sims = torch.stack([image_emb(model, transform, im) for im in images]) @ torch.stack(
        [text_emb(model, c) for _, c in captions]).T
    expected: dict[str, float] = {}
    for k in (1, 5, 10):
        hits = 0
        for i in range(len(images)):  # an image query hits when any of its captions is in the top k
            best = max(float(sims[i, t]) for t, (owner, _) in enumerate(captions) if owner == i)
            above = sum(1 for t, (owner, _) in enumerate(captions) if owner != i and float(sims[i, t]) >= best)
            hits += above < k
        expected[f"itc/txt_r{k}"] = 100.0 * hits / len(images)
        hits = 0
        for t, (owner, _) in enumerate(captions):
            above = sum(1 for i in range(len(images)) if i != owner and float(sims[i, t]) >= float(sims[owner, t]))
            hits += above < k
        expected[f"itc/img_r{k}"] = 100.0 * hits / len(captions)
    for key, value in expected.items():
        assert out["karpathy"]["metrics"][key] == pytest.approx(value), key
    split = load_retrieval_split(data, data.parent)
    for score in ("itm", "itm+itc", "itm+itc_logit"):  # the one-pass ITM columns equal evaluate_retrieval per score
        reference = evaluate_retrieval(model, split, transform, EvalConfig(k_test=3, score=score,
                                       precision="fp32"), progress=False)
        for key, value in reference["itm"].items():
            assert out["karpathy"]["metrics"][f"{score}/{key}"] == pytest.approx(value), (score, key)
    # the webdataset export of the same split (two shards) gives the same numbers
    assert out["wds"]["metrics"] == pytest.approx(out["karpathy"]["metrics"])
    assert out["karpathy"]["protocol"]["num_texts"] == len(captions) and out["karpathy"]["protocol"]["k_test"] == 3


# ------------------------------------------------------------------------------------------ zero-shot
def test_zeroshot_imagefolder_and_wds_match_brute_force(checkpoint: Path, tmp_path: Path) -> None:
    folder = write_imagefolder(tmp_path / "folder")
    names, templates = tmp_path / "names.txt", tmp_path / "templates.txt"
    names.write_text("\n".join(CLASSES))
    templates.write_text("\n".join(TEMPLATES))
    wds_root = write_wds_classification(tmp_path / "wds_colors")
    out = run(tmp_path, checkpoint, {
        "folder": {"type": "zeroshot", "data": str(folder), "classnames": str(names), "templates": str(templates),
                   "itm_k": 2},
        "wds": {"type": "zeroshot", "format": "wds", "data": str(wds_root), "templates": "ignored.txt", "itm_k": 2}})
    model, transform = load(checkpoint)
    prompts = [[t.replace("{c}", name) for t in TEMPLATES] for name in CLASSES]
    classifier = torch.stack([torch.nn.functional.normalize(torch.stack([text_emb(model, p) for p in group]).mean(0), dim=0)
                              for group in prompts])
    per_class: dict[int, list[bool]] = {}
    hits_itc = hits_itm = hits_sum = 0
    scale = float(model.logit_scale())
    for label, image in labelled_images():
        scores = classifier @ image_emb(model, transform, image)
        top = int(scores.argmax())
        correct = top == label and int((scores >= scores[label]).sum()) == 1
        hits_itc += correct
        per_class.setdefault(label, []).append(correct)
        candidates = scores.topk(2).indices.tolist()  # ITM re-scores the top 2 with the first template
        matched = max(candidates, key=lambda c: itm(model, transform, image, prompts[c][0]))
        hits_itm += matched == label
        # itm+itc_logit: the log-odds plus the logit scale times the class's ensemble cosine
        summed = max(candidates, key=lambda c: itm(model, transform, image, prompts[c][0]) + scale * float(scores[c]))
        hits_sum += summed == label
    count = len(labelled_images())
    assert out["folder"]["metrics"]["itc/top1"] == pytest.approx(100.0 * hits_itc / count)
    assert out["folder"]["metrics"]["itm/top1"] == pytest.approx(100.0 * hits_itm / count)
    assert out["folder"]["metrics"]["itm+itc_logit/top1"] == pytest.approx(100.0 * hits_sum / count)
    assert out["folder"]["protocol"]["scores"] == ["itc", "itm", "itm+itc_logit"]
    recall = sum(sum(v) / len(v) for v in per_class.values()) / len(per_class)
    assert out["folder"]["metrics"]["itc/mean_per_class_recall"] == pytest.approx(100.0 * recall)
    assert "itc/top5" not in out["folder"]["metrics"]  # three classes: no top-5, as CLIP_benchmark
    # the benchmark's sharded loop and evaluate_zeroshot share one per-batch step: the same top-1 per rule
    split = SimpleNamespace(labels=[label for label, _ in labelled_images()],
                            image_dataset=lambda t: [t(image) for _, image in labelled_images()])
    for score in ("itm", "itm+itc_logit"):
        reference = evaluate_zeroshot(model, split, transform, CLASSES, [t.replace("{c}", "{}") for t in TEMPLATES],
                                      batch_size=3, precision="fp32", progress=False, itm_rerank_k=2, score=score)
        assert out["folder"]["metrics"][f"{score}/top1"] == pytest.approx(reference["itm_top1"]), score
        assert out["folder"]["metrics"]["itc/top1"] == pytest.approx(reference["itc_top1"])
    # the wds export carries its own classnames.txt and {c} templates: they win over the task's file
    assert out["wds"]["metrics"] == pytest.approx(out["folder"]["metrics"])
    assert out["wds"]["protocol"]["prompts"]["templates"].endswith("zeroshot_classification_templates.txt")


def test_imagenet_prompts_come_from_open_clip(tmp_path: Path) -> None:
    from open_clip import zero_shot_metadata

    from vlp.benchmark.zeroshot import load_zeroshot_task

    root = tmp_path / "imagenet"
    for k in range(1000):
        (root / f"n{k:08d}").mkdir(parents=True)
    labelled_images()[0][1].save(root / "n00000000" / "a.png")
    suite = tmp_path / "s.yaml"
    suite.write_text(json.dumps({"tasks": {"in1k": {"type": "zeroshot", "data": str(root), "classnames": "imagenet1k",
                                                    "templates": "imagenet1k"}}}))
    data = load_zeroshot_task("in1k", load_suite(suite).tasks["in1k"])  # type: ignore[arg-type]
    assert data.classnames == list(zero_shot_metadata.IMAGENET_CLASSNAMES)
    assert data.templates == [t("{}") for t in zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES]
    assert data.prompts["classnames"].startswith("open_clip")


# ------------------------------------------------------------------------------------------ compositionality
def _choice(model: Any, transform: Any, image: Image.Image, options: list[str], score: str) -> bool:
    values = [pair_score(model, transform, image, text, score) for text in options]
    return all(values[0] > v for v in values[1:])


def test_sugarcrepe_winoground_vg_and_order_match_brute_force(checkpoint: Path, tmp_path: Path) -> None:
    sugar, coco = write_sugarcrepe(tmp_path / "sugar")
    wino = write_winoground(tmp_path / "wino")
    relation, vg_images = write_vg(tmp_path / "vgr", attribution=False)
    attribution, vga_images = write_vg(tmp_path / "vga", attribution=True)
    order, order_images = write_order(tmp_path / "order")
    out = run(tmp_path, checkpoint, {
        "sugarcrepe": {"type": "sugarcrepe", "data": str(sugar), "image_root": str(coco)},
        "winoground": {"type": "winoground", "data": str(wino)},
        "vgr": {"type": "vg_relation", "data": str(relation), "image_root": str(vg_images)},
        "vga": {"type": "vg_attribution", "data": str(attribution), "image_root": str(vga_images), "min_count": 4},
        "order": {"type": "order", "data": str(order), "image_root": str(order_images)}})
    model, transform = load(checkpoint)
    for score in ("itc", "itm"):
        for category in ("swap_att", "replace_obj"):
            records = json.loads((sugar / f"{category}.json").read_text()).values()
            hits = [_choice(model, transform, Image.open(coco / r["filename"]).convert("RGB"),
                            [r["caption"], r["negative_caption"]], score) for r in records]
            assert out["sugarcrepe"]["metrics"][f"{score}/{category}"] == pytest.approx(100.0 * sum(hits) / len(hits))
        text = image = group = 0
        lines = [json.loads(line) for line in (wino / "examples.jsonl").read_text().splitlines()]
        for e in lines:
            ims = [Image.open(wino / "images" / f"{e[f'image_{k}']}.png").convert("RGB") for k in (0, 1)]
            s = [[pair_score(model, transform, ims[i], e[f"caption_{c}"], score) for i in (0, 1)] for c in (0, 1)]
            t_ok = s[0][0] > s[1][0] and s[1][1] > s[0][1]
            i_ok = s[0][0] > s[0][1] and s[1][1] > s[1][0]
            text, image, group = text + t_ok, image + i_ok, group + (t_ok and i_ok)
        for name, value in (("text", text), ("image", image), ("group", group)):
            assert out["winoground"]["metrics"][f"{score}/{name}"] == pytest.approx(100.0 * value / len(lines))
        for task, path, root, key in (("vgr", relation, vg_images, "relation_name"),
                                      ("vga", attribution, vga_images, "attributes")):
            groups: dict[str, list[bool]] = {}
            for r in json.loads(path.read_text()):
                box = (r["bbox_x"], r["bbox_y"], r["bbox_x"] + r["bbox_w"], r["bbox_y"] + r["bbox_h"])
                crop = Image.open(root / r["image_path"]).convert("RGB").crop(box)
                name = r[key] if task == "vgr" else "_".join(r[key])
                groups.setdefault(name, []).append(_choice(model, transform, crop, [r["true_caption"],
                                                                                    r["false_caption"]], score))
            kept = [v for v in groups.values() if len(v) >= (1 if task == "vgr" else 4)]  # vga: min_count 4
            macro = sum(100.0 * sum(v) / len(v) for v in kept) / len(kept)
            assert out[task]["metrics"][f"{score}/macro_accuracy"] == pytest.approx(macro), task
        records = json.loads(order.read_text())
        hits = [_choice(model, transform, Image.open(order_images / r["image"]).convert("RGB"), r["caption_options"],
                        score) for r in records]
        assert out["order"]["metrics"][f"{score}/accuracy"] == pytest.approx(100.0 * sum(hits) / len(hits))


def test_vg_crop_is_what_the_model_sees(tmp_path: Path) -> None:
    from vlp.benchmark.compositional import load_vg
    from vlp.benchmark.files import ImageRefs

    relation, images = write_vg(tmp_path / "vgr", attribution=False)
    suite = tmp_path / "s.yaml"
    suite.write_text(json.dumps({"tasks": {"vgr": {"type": "vg_relation", "data": str(relation),
                                                   "image_root": str(images)}}}))
    selection = load_vg("vgr", load_suite(suite).tasks["vgr"], attribution=False)  # type: ignore[arg-type]
    refs = ImageRefs(selection.table.paths, lambda im: im, selection.table.boxes)
    first = json.loads(relation.read_text())[0]
    assert refs[0].size == (first["bbox_w"], first["bbox_h"])


def test_every_task_type_has_a_fixture_here() -> None:
    assert set(TASK_TYPES) == {"retrieval", "zeroshot", "linear_probe", "sugarcrepe", "winoground", "vg_relation",
                               "vg_attribution", "order"}  # linear_probe: tests/test_benchmark_metrics.py
