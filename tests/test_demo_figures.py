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
    config = load_config(ROOT / "configs/finetune/vqa.yaml")
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


def test_zeroshot_above_chance(tmp_path: Path) -> None:
    from vlp.data.synthetic import write_synthetic

    data = write_synthetic(tmp_path / "synth", train_size=0, test_size=1000, seed=0, image_size=64)
    out = tmp_path / "zs.json"
    assert main(["eval", "zeroshot", "--checkpoint", str(DEMO / "final"), "--data", str(data["zeroshot"]),
                 "--image-root", str(data["root"]), "--classes", str(data["classes"]), "--output", str(out),
                 "--no-progress"]) == 0
    result = json.loads(out.read_text())
    chance = 100.0 / result["num_classes"]
    print(f"zero-shot shape ({result['num_images']} images): ITC top-1 {result['itc_top1']:.1f}, "
          f"ITM re-scored top-1 {result.get('itm_top1', float('nan')):.1f} (chance {chance:.1f})")
    assert result["itc_top1"] > 2 * chance


def test_retrieval_finetune_improves_r1(tmp_path: Path) -> None:
    run = tmp_path / "ret"
    assert main(["finetune", "retrieval", str(ROOT / "configs/finetune/retrieval.yaml"), "--init",
                 str(DEMO / "final"), "--output-dir", str(run), "--set", "train.progress=false",
                 "--set", "train.max_steps=200"]) == 0
    before, after = _retrieval(DEMO), _retrieval(run)
    print(f"retrieval fine-tuning: text->image R@1 {before['itm']['img_r1']:.1f} -> {after['itm']['img_r1']:.1f}, "
          f"image->text R@1 {before['itm']['txt_r1']:.1f} -> {after['itm']['txt_r1']:.1f}")
    assert after["itm"]["img_r1"] > before["itm"]["img_r1"]
