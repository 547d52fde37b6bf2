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


def test_demo_match_head_trains_and_re_ranking_beats_itc() -> None:
    """Issue targets on the demo: ITM leaves its label prior early and ends low, recognises positives, and
    its re-ranking (the config's eval.score) is at or above the contrastive ranking in both directions."""
    rows = [json.loads(line) for line in (DEMO / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = {row["step"]: row for row in rows if "itm" in row}
    early = min(train[step]["itm"] for step in train if step <= 150)
    result = _retrieval(DEMO)
    curve = ", ".join(f"{step}: {train[step]['itm']:.3f}" for step in sorted(train) if step % 100 == 0 or step == 140)
    print(f"demo ITM loss by step: {curve}; itm_acc_pos {train[max(train)]['itm_acc_pos']:.2f}, "
          f"itm_acc_neg {train[max(train)]['itm_acc_neg']:.2f} at the end")
    assert early < 0.60
    assert train[max(train)]["itm"] <= 0.30
    assert train[max(train)]["itm_acc_pos"] >= 0.8
    assert result["itm"]["img_r1"] >= result["itc"]["img_r1"]
    assert result["itm"]["txt_r1"] >= result["itc"]["txt_r1"]


def test_vqa_finetune_uses_the_image(tmp_path: Path) -> None:
    """The fine-tuned model beats what the question alone gives on every answer type (the baselines that
    fine-tuning writes beside the score, fitted on the training questions)."""
    run = tmp_path / "vqa"
    assert main(["finetune", "vqa", str(ROOT / "configs/finetune/vqa.yaml"), "--init", str(DEMO / "final"),
                 "--output-dir", str(run), "--set", "train.progress=false"]) == 0
    metrics = json.loads((run / "eval_vqa.json").read_text())
    question_only, majority = metrics["baselines"]["question_only"], metrics["baselines"]["majority_answer"]
    print(f"VQA: fine-tuned {metrics['overall']:.1f} vs question-only {question_only['overall']:.1f} vs majority "
          f"answer '{metrics['baselines_info']['majority_answer']}' {majority['overall']:.1f}; per type: "
          + ", ".join(f"{kind} {value:.1f} (question-only {question_only[kind]:.1f}, majority {majority[kind]:.1f})"
                      for kind, value in metrics["per_type"].items()))
    assert metrics["overall"] > majority["overall"] + 20
    for kind in ("yes/no", "number", "other"):
        assert metrics["per_type"][kind] >= question_only[kind] + 5, kind


def test_zeroshot_itm_at_least_itc() -> None:
    """Zero-shot colour and shape of 5,000 single-object test scenes (descriptions never seen in training):
    the match head's re-scoring of the contrastive top 3, under the demo's re-rank rule (eval.score), must not
    lose to the contrastive ranking; the head's log-odds alone are printed beside it."""
    import yaml

    import vlp
    from vlp.data.synthetic import ZEROSHOT_TEMPLATES, SyntheticScenes
    from vlp.data.vqa_data import synthetic_zeroshot
    from vlp.eval.zeroshot import evaluate_zeroshot

    rule = yaml.safe_load((DEMO / "config.yaml").read_text())["eval"]["score"]
    model, _, transform = vlp.load(DEMO / "final")
    scenes = SyntheticScenes(5000, seed=0, split="test", image_size=model.image_encoder.image_size,
                             single_objects=True)
    results = {}
    for attribute in ("color", "shape"):
        split = synthetic_zeroshot(scenes, attribute)
        for score in dict.fromkeys(("itm", rule)):
            r = evaluate_zeroshot(model, split, transform, split.classes, ZEROSHOT_TEMPLATES[attribute],
                                  progress=False, itm_rerank_k=3, precision="fp32", score=score)
            print(f"zero-shot {attribute} ({r['num_images']} single-object test images, {r['num_classes']} classes): "
                  f"ITC top-1 {r['itc_top1']:.1f}, ITM re-scored top-1 ({score}) {r['itm_top1']:.1f} "
                  f"(chance {100 / r['num_classes']:.1f})")
        results[attribute] = r
    assert results["color"]["num_images"] >= 5000
    assert results["color"]["itm_top1"] >= 95
    assert results["shape"]["itm_top1"] >= results["shape"]["itc_top1"]


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
