"""End to end: pretrain a tiny model, fine-tune it for VQA and retrieval, evaluate through the CLI."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from vlp.cli.main import main
from vlp.data.synthetic import SyntheticScenes
from vlp.data.vqa_data import synthetic_vqa
from vlp.eval.vqa_baselines import AnswerPriors, vqa_baselines

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "run"
    assert main(["pretrain", str(ROOT / "configs/pretrain/demo_tiny.yaml"), "--output-dir", str(out)]) == 0
    return out / "final"


@pytest.fixture(scope="module")
def dual_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clip") / "run"
    assert main(["pretrain", str(ROOT / "configs/pretrain/clip_cc3m_tiny.yaml"), "--output-dir", str(out)]) == 0
    return out / "final"


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--out", str(out), "--train-size", "8", "--test-size", "10",
                 "--image-size", "32"]) == 0
    return out


def test_eval_retrieval_cli_reports_itc_and_itm(pretrained: Path, synth: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    code = main(["eval", "retrieval", "--checkpoint", str(pretrained), "--data", str(synth / "test.json"),
                 "--image-root", str(synth), "--k-test", "4", "--output", str(out), "--no-progress"])
    assert code == 0
    result = json.loads(out.read_text())
    for kind in ("itc", "itm"):
        metrics = result[kind]
        assert set(metrics) >= {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}
        assert all(0.0 <= v <= 100.0 for v in metrics.values())
        assert metrics["img_r10"] == 100.0  # a gallery of 10 images: the right one is always in the top 10
    assert result["score"] == "itm" and result["k_test"] == 4
    assert out.with_suffix(".png").is_file()


def test_eval_retrieval_k_test_larger_than_gallery_is_clamped(pretrained: Path, synth: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "r.json"
    with caplog.at_level(logging.WARNING, logger="vlp"):
        code = main(["eval", "retrieval", "--checkpoint", str(pretrained), "--data", str(synth / "test.json"),
                     "--image-root", str(synth), "--k-test", "500", "--output", str(out), "--no-progress"])
    assert code == 0
    result = json.loads(out.read_text())
    assert (result["k_test"], result["k_test_requested"], result["num_images"]) == (10, 500, 10)
    assert result["itm"]["img_r10"] == 100.0  # all 10 images re-ranked
    notes = [r.getMessage() for r in caplog.records if "larger than the test gallery" in r.getMessage()]
    assert notes == ["k_test 500 is larger than the test gallery (10 images, 50 captions): re-ranking the top 10 "
                     "candidates instead"]


def test_finetune_vqa_then_eval_vqa(pretrained: Path, synth: Path, tmp_path: Path) -> None:
    run = tmp_path / "vqa"
    # the head reads the fused output and the image embedding; eval vqa rebuilds it from the checkpoint
    assert main(["finetune", "vqa", str(ROOT / "configs/finetune/vqa_tiny.yaml"), "--init", str(pretrained),
                 "--output-dir", str(run), "--set", "vqa.head_input=fused+image"]) == 0
    assert (run / "final" / "vqa_head.safetensors").is_file() and (run / "final" / "answers.json").is_file()
    final = json.loads((run / "eval_vqa.json").read_text())
    assert final["num_questions"] > 0
    # the image-blind baselines sit beside the score, fitted on the run's training questions
    train_questions, test_questions = (synthetic_vqa(SyntheticScenes(n, split=s)) for n, s in ((24, "train"), (8, "test")))
    fitted = vqa_baselines(AnswerPriors.fit(train_questions), test_questions)["baselines"]
    assert final["baselines"].keys() == fitted.keys() == {"question_only", "majority_answer"}
    for name, values in fitted.items():
        assert final["baselines"][name] == pytest.approx(values)
    assert final["baselines"]["question_only"].keys() == {"overall", *final["per_type"]}
    out = tmp_path / "vqa.json"
    assert main(["eval", "vqa", "--checkpoint", str(run / "final"), "--data", str(synth / "vqa_test.json"),
                 "--image-root", str(synth), "--output", str(out), "--no-progress"]) == 0
    metrics = json.loads(out.read_text())
    assert 0.0 <= metrics["overall"] <= 100.0
    assert set(metrics["per_type"]) <= {"yes/no", "number", "other"} and metrics["per_type"]
    # --train-data auto: the synthetic questions the checkpoint was fine-tuned on (24 training scenes)
    expected = vqa_baselines(AnswerPriors.fit(train_questions), json.loads((synth / "vqa_test.json").read_text()))
    for name in ("question_only", "majority_answer"):
        assert metrics["baselines"][name] == pytest.approx(expected["baselines"][name])
        assert metrics["baselines"][name].keys() == {"overall", *metrics["per_type"]}
    assert metrics["baselines_info"]["train_questions"] == len(train_questions)
    # a training file instead (its images are not read), or no baselines
    assert main(["eval", "vqa", "--checkpoint", str(run / "final"), "--data", str(synth / "vqa_test.json"),
                 "--image-root", str(synth), "--output", str(out), "--no-progress",
                 "--train-data", str(synth / "vqa_train.json")]) == 0
    from_file = json.loads(out.read_text())
    assert from_file["baselines_info"]["train_questions"] == len(json.loads((synth / "vqa_train.json").read_text()))
    assert from_file["overall"] == metrics["overall"]
    assert main(["eval", "vqa", "--checkpoint", str(run / "final"), "--data", str(synth / "vqa_test.json"),
                 "--image-root", str(synth), "--output", str(out), "--no-progress", "--train-data", "none"]) == 0
    assert "baselines" not in json.loads(out.read_text())
    predictions = json.loads(Path(metrics["predictions"]).read_text())
    questions = json.loads((synth / "vqa_test.json").read_text())
    assert sorted(p["question_id"] for p in predictions) == sorted(q["question_id"] for q in questions)


def test_eval_vqa_train_data_errors(pretrained: Path, synth: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(pretrained, checkpoint)
    for name in ("vqa_head.safetensors", "answers.json"):  # present but never read: the error comes first
        (checkpoint / name).write_bytes(b"")
    config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    config["run"] = {"vqa": {"train": str(tmp_path / "gone.json")}}
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(config))
    args = ["eval", "vqa", "--checkpoint", str(checkpoint), "--data", str(synth / "vqa_test.json"),
            "--image-root", str(synth), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--train-data" in err and "gone.json" in err and len(err.splitlines()) == 1
    assert main([*args, "--train-data", str(tmp_path / "missing.json")]) == 2
    assert "--train-data: file not found" in capsys.readouterr().err


def test_vqa_on_a_dual_encoder_fails_clearly(dual_encoder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["finetune", "vqa", str(ROOT / "configs/finetune/vqa_tiny.yaml"), "--init", str(dual_encoder)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no fusion" in err and len(err.splitlines()) == 1


def test_eval_vqa_needs_a_vqa_checkpoint(pretrained: Path, synth: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", "vqa", "--checkpoint", str(pretrained), "--data", str(synth / "vqa_test.json"),
                 "--image-root", str(synth), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "finetune vqa" in err


def test_finetune_retrieval_runs_and_evaluates(pretrained: Path, tmp_path: Path) -> None:
    run = tmp_path / "ret"
    assert main(["finetune", "retrieval", str(ROOT / "configs/finetune/retrieval_tiny.yaml"), "--init",
                 str(pretrained), "--output-dir", str(run)]) == 0
    result = json.loads((run / "eval_retrieval.json").read_text())
    assert "itm" in result and "itc" in result
    resolved = (run / "config.yaml").read_text()
    assert "albef_base_tiny" in resolved  # the model section comes from the checkpoint


def test_eval_zeroshot_cli(pretrained: Path, dual_encoder: Path, synth: Path, tmp_path: Path) -> None:
    for checkpoint, fused in ((pretrained, True), (dual_encoder, False)):
        out = tmp_path / f"z{fused}.json"
        assert main(["eval", "zeroshot", "--checkpoint", str(checkpoint), "--data", str(synth / "zeroshot.json"),
                     "--image-root", str(synth), "--classes", str(synth / "classes.json"), "--output", str(out),
                     "--no-progress"]) == 0
        result = json.loads(out.read_text())
        assert 0.0 <= result["itc_top1"] <= result["itc_top5"] <= 100.0
        assert ("itm_top1" in result) == fused
