"""Figures on the synthetic dataset from the demo checkpoint (slow: run by hand after `make demo`).

    .venv/bin/python -m pytest -m slow tests/test_demo_figures.py -s

Each test prints the figure it measures; README.md states the numbers from the last run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlp.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "runs" / "demo"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (DEMO / "final").is_dir(), reason="run `make demo` first")]


def _retrieval(run: Path) -> dict[str, dict[str, float]]:
    return json.loads((run / "eval_retrieval.json").read_text())  # type: ignore[no-any-return]


def test_demo_retrieval_far_above_chance() -> None:
    result = _retrieval(DEMO)
    chance = 100.0 / result["num_images"]
    print(f"demo: text->image R@1 ITC {result['itc']['img_r1']:.1f} ITM {result['itm']['img_r1']:.1f} "
          f"(chance {chance:.2f}); image->text R@1 ITC {result['itc']['txt_r1']:.1f} ITM {result['itm']['txt_r1']:.1f}")
    assert result["itm"]["img_r1"] > 20 * chance


def test_vqa_finetune_beats_majority_answer(tmp_path: Path) -> None:
    from vlp.config import load_config
    from vlp.data.synthetic import SyntheticScenes
    from vlp.data.vqa_data import synthetic_vqa
    from vlp.eval.vqa import vqa_accuracy

    run = tmp_path / "vqa"
    assert main(["finetune", "vqa", str(ROOT / "configs/finetune/vqa.yaml"), "--init", str(DEMO / "final"),
                 "--output-dir", str(run), "--set", "train.progress=false", "--set", "train.max_steps=300"]) == 0
    metrics = json.loads((run / "eval_vqa.json").read_text())
    from vlp.models.persist import read_checkpoint_config

    config = load_config(ROOT / "configs/finetune/vqa.yaml", model=read_checkpoint_config(DEMO / "final")["model"])
    questions = synthetic_vqa(SyntheticScenes(config.data.synthetic_test_size, seed=config.data.synthetic_seed,
                                              split="test"))
    train = synthetic_vqa(SyntheticScenes(2000, seed=config.data.synthetic_seed, split="train"))
    counts: dict[str, int] = {}
    for q in train:
        for a in q["answer"]:
            counts[a] = counts.get(a, 0) + 1
    majority = max(counts, key=lambda a: counts[a])
    baseline = 100.0 * sum(vqa_accuracy(majority, q["answer"]) for q in questions) / len(questions)
    print(f"VQA: fine-tuned {metrics['overall']:.1f} vs majority answer '{majority}' {baseline:.1f}; "
          f"per type {metrics['per_type']}")
    assert metrics["overall"] > baseline + 20


def test_zeroshot_above_chance() -> None:
    import vlp
    from vlp.data.synthetic import ZEROSHOT_TEMPLATES, SyntheticScenes
    from vlp.data.vqa_data import synthetic_zeroshot
    from vlp.eval.zeroshot import evaluate_zeroshot

    model, _, transform = vlp.load(DEMO / "final")
    scenes = SyntheticScenes(1000, seed=0, split="test", image_size=model.image_encoder.image_size)
    results = {}
    for attribute in ("color", "shape"):
        split = synthetic_zeroshot(scenes, attribute)
        results[attribute] = evaluate_zeroshot(model, split, transform, split.classes, ZEROSHOT_TEMPLATES[attribute],
                                               progress=False, itm_rerank_k=3)
        r = results[attribute]
        print(f"zero-shot {attribute} ({r['num_images']} single-object test images, {r['num_classes']} classes): "
              f"ITC top-1 {r['itc_top1']:.1f}, ITM re-scored top-1 {r['itm_top1']:.1f} "
              f"(chance {100 / r['num_classes']:.1f})")
    assert results["color"]["itc_top1"] > 3 * 100 / results["color"]["num_classes"]


def test_retrieval_finetune_improves_r1(tmp_path: Path) -> None:
    run = tmp_path / "ret"
    assert main(["finetune", "retrieval", str(ROOT / "configs/finetune/retrieval.yaml"), "--init",
                 str(DEMO / "final"), "--output-dir", str(run), "--set", "train.progress=false"]) == 0
    before, after = _retrieval(DEMO), _retrieval(run)
    for score in ("itc", "itm"):
        print(f"retrieval fine-tuning ({score}): text->image R@1 {before[score]['img_r1']:.1f} -> "
              f"{after[score]['img_r1']:.1f}, image->text R@1 {before[score]['txt_r1']:.1f} -> "
              f"{after[score]['txt_r1']:.1f}")
        assert after[score]["img_r1"] > before[score]["img_r1"] + 1.0
        assert after[score]["txt_r1"] > before[score]["txt_r1"] + 1.0
