"""What a new user's first runs must not silently get wrong: their captions turned into [UNK], two runs mixed
in one run directory, a learning rate divided by the batch ratio, a small test set refused, a resume stuck
on an unreadable checkpoint, a local imagefolder that reports a download."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from vlp.cli.main import main
from vlp.config import Config, load_config
from vlp.data.tokenizers import word_tokenizer
from vlp.errors import UserError
from vlp.train.loop import pretrain
from vlp.train.optim import scaled_lr

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs/pretrain/demo_tiny.yaml"
SHIPPED = sorted((ROOT / "configs").glob("*/*.yaml"))


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(("INFO ", "WARNING "))]
    assert len(lines) == 1, lines
    return lines[0]


def _pairs(root: Path, captions: list[str]) -> Path:
    """A JSON pairs file of one small image per caption."""
    (root / "images").mkdir(parents=True)
    records = []
    for i, caption in enumerate(captions):
        Image.new("RGB", (20, 20), (40 * i % 255, 90, 200)).save(root / "images" / f"{i}.png")
        records.append({"image": f"images/{i}.png", "caption": caption})
    (root / "pairs.json").write_text(json.dumps(records))
    return root / "pairs.json"


# ---------------------------------------------------------------- 1. own captions and the tokenizer

def test_own_captions_with_the_synthetic_tokenizer_stop_before_any_work(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    data = _pairs(tmp_path / "data", ["a dog runs on the beach"] * 8)
    own = _sets("data.source=json", f"data.train={data}", f"data.image_root={data.parent}")
    # named: demo_tiny's model preset says tokenizer: synthetic
    assert main(["pretrain", str(DEMO), "--output-dir", str(tmp_path / "named"), *own]) == 2
    line = _error_line(capsys)
    assert line.startswith("vlp: error: data.source is 'json' but model.text.tokenizer is 'synthetic'")
    assert "'clip'" in line and "local tokenizer path" in line and "[UNK]" in line
    # default: a config that names no tokenizer
    config = {"model": {"image": {"image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "num_heads": 2},
                        "text": {"width": 32, "depth": 1, "num_heads": 2, "max_length": 16}}}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(config))
    assert main(["pretrain", str(tmp_path / "mine.yaml"), "--output-dir", str(tmp_path / "default"), *own]) == 2
    assert "model.text.tokenizer is 'synthetic'" in _error_line(capsys)
    assert not (tmp_path / "named").exists() and not (tmp_path / "default").exists()


def _word_tokenizer_dir(tmp_path: Path) -> Path:
    """A local word-level tokenizer knowing only four words (a vocabulary that does not cover every caption)."""
    directory = tmp_path / "tok"
    word_tokenizer(["red", "circle", "blue", "square"]).save(directory)
    return directory


def _unk_run(tmp_path: Path, name: str, captions: list[str], *extra: str) -> list[str]:
    data = _pairs(tmp_path / f"data_{name}", captions)
    return ["pretrain", str(DEMO), "--output-dir", str(tmp_path / name),
            *_sets("data.source=json", f"data.train={data}", f"data.image_root={data.parent}", "data.batch_size=4",
                   f"model.text.tokenizer={tmp_path / 'tok'}", "model.text.max_length=32", "train.max_steps=2",
                   "train.checkpoint_every=0", *extra)]


def test_unknown_tokens_are_counted_warned_about_and_stop_the_run(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _word_tokenizer_dir(tmp_path)
    # 20 known words and one unknown per caption: 1 / 21 = 4.8% of the word tokens, between 1% and 5%
    mostly_known = ["red circle blue square " * 5 + "zebra"] * 8
    with caplog.at_level(logging.WARNING, logger="vlp"):
        assert main(_unk_run(tmp_path, "warn", mostly_known)) == 0
    steps = [r for r in _records(tmp_path / "warn") if "unk_fraction" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["unk_fraction"] == pytest.approx(1 / 21) for r in steps)
    warnings = [r.getMessage() for r in caplog.records if "unknown to the tokenizer" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("4.8% of the caption tokens (4 of 84 on this process)")

    # one unknown word in three: stops after the first step, one line naming the limit and the way out
    assert main(_unk_run(tmp_path, "stop", ["a red circle"] * 8)) == 2
    line = _error_line(capsys)
    assert "33.3% of the caption tokens" in line and "above data.max_unk_fraction=0.05" in line and "'clip'" in line
    assert not (tmp_path / "stop" / "final").exists()
    assert main(_unk_run(tmp_path, "allowed", ["a red circle"] * 8, "data.max_unk_fraction=0.5")) == 0
    assert _records(tmp_path / "allowed")[-1]["unk_fraction"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------- 2. one run per run directory

def test_a_second_run_into_a_run_directory_is_refused_unless_resumed_or_overwritten(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    args = ["pretrain", str(DEMO), "--output-dir", str(run), *_sets("train.max_steps=2")]
    assert main(args) == 0
    before = (run / "metrics.jsonl").read_text()
    (run / "notes.txt").write_text("mine")
    assert main(args) == 2
    assert _error_line(capsys) == (f"vlp: error: {run} already holds a run (config.yaml, metrics.jsonl, "
                                   "checkpoints/, final/): use --resume to continue it or --overwrite to start over")
    assert (run / "metrics.jsonl").read_text() == before  # untouched
    assert main([*args, "--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite exclude each other" in _error_line(capsys)

    capsys.readouterr()
    assert main(["pretrain", str(DEMO), "--output-dir", str(run), "--overwrite", *_sets("train.max_steps=3")]) == 0
    steps = [r["step"] for r in _records(run)]
    assert steps.count(0) == 1 and steps[-1] == 3 and steps == sorted(steps)  # one run, not two appended
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_3"]  # keep_last of the new run
    assert (run / "notes.txt").read_text() == "mine"  # only what vlp writes is removed

    # fine-tuning writes a run directory too
    tuned = tmp_path / "tuned"
    tune = ["finetune", "retrieval", str(ROOT / "configs/finetune/retrieval_tiny.yaml"), "--init", str(run / "final"),
            "--output-dir", str(tuned), *_sets("train.max_steps=1", "eval.every=-1")]
    assert main(tune) == 0
    assert main(tune) == 2
    assert "already holds a run" in _error_line(capsys)
    assert main([*tune, "--overwrite"]) == 0


def test_data_synth_into_a_non_empty_directory_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "train.jsonl").write_text('{"image": "mine.png", "caption": "hand written"}\n')
    args = ["data", "synth", "--out", str(out), "--train-size", "2", "--test-size", "2", "--image-size", "16"]
    assert main(args) == 2
    line = _error_line(capsys)
    assert "is not empty" in line and "use --force" in line
    assert (out / "train.jsonl").read_text() == '{"image": "mine.png", "caption": "hand written"}\n'
    assert main([*args, "--force"]) == 0
    assert "hand written" not in (out / "train.jsonl").read_text()
    assert main(["data", "synth", "--out", str(tmp_path / "new"), "--train-size", "2", "--test-size", "2",
                 "--image-size", "16"]) == 0  # a new or empty directory needs nothing


# ---------------------------------------------------------------- 3. the learning rate

def test_lr_is_used_as_given_unless_base_batch_size_is_set(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert Config().optim.base_batch_size == 0
    assert scaled_lr(1e-4, 0, 8, "linear") == scaled_lr(1e-4, 0, 8192, "sqrt") == 1e-4
    assert scaled_lr(1e-4, 256, 8, "linear") == pytest.approx(3.125e-6)
    base = yaml.safe_load(DEMO.read_text())
    del base["optim"]["base_batch_size"]
    (tmp_path / "given.yaml").write_text(yaml.safe_dump(base))
    with caplog.at_level(logging.INFO, logger="vlp"):
        pretrain(load_config(tmp_path / "given.yaml", ["train.max_steps=1"]), output_dir=tmp_path / "given")
        pretrain(load_config(DEMO, ["train.max_steps=1", "data.batch_size=4"]), output_dir=tmp_path / "scaled")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("optim.lr ")]
    assert lines == ["optim.lr 0.001 given, effective batch 8, lr used 0.001 (optim.base_batch_size 0: as given)",
                     "optim.lr 0.001 given, effective batch 4, lr used 0.0005 (linear scaling from "
                     "optim.base_batch_size 8)"]
    assert _records(tmp_path / "given")[0] == {"step": 0, "lr_scaled": 1e-3, "lr_given": 1e-3, "effective_batch_size": 8}
    assert _records(tmp_path / "scaled")[0]["lr_scaled"] == pytest.approx(5e-4)


@pytest.mark.parametrize("path", SHIPPED, ids=[f"{p.parent.name}/{p.stem}" for p in SHIPPED])
def test_shipped_training_configs_set_base_batch_size(path: Path) -> None:
    """The default changed to 0 (lr as given); the shipped recipes keep their scaling by saying it."""
    data = yaml.safe_load(path.read_text())
    if path.parent.name in ("pretrain", "finetune"):
        assert "optim" in data, path
    if isinstance(data, dict) and "optim" in data:  # model presets and benchmark settings have none
        assert data["optim"]["base_batch_size"] > 0, path


# ---------------------------------------------------------------- 5. k_test and a small test gallery

def test_k_test_larger_than_the_gallery_is_clamped_once_at_training_start(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(DEMO, ["train.max_steps=1", "eval.every=0", "eval.k_test=100", "data.synthetic_test_size=6"])
    with caplog.at_level(logging.WARNING, logger="vlp"):
        pretrain(config, output_dir=tmp_path / "run")
    result = json.loads((tmp_path / "run" / "eval_retrieval.json").read_text())
    assert result["k_test"] == 6 and result["num_images"] == 6 and "itm" in result
    notes = [r.getMessage() for r in caplog.records if "larger than the test gallery" in r.getMessage()]
    assert notes == ["eval.k_test 100 is larger than the test gallery (6 images, 30 captions): re-ranking the top 6 "
                     "candidates instead"]


# ---------------------------------------------------------------- 10. resume and imagefolder

def test_resume_falls_back_to_the_previous_checkpoint_when_the_newest_is_unreadable(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    pretrain(load_config(DEMO, ["train.max_steps=2"]), output_dir=run)
    newest = run / "checkpoints" / "step_2" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a truncated copy
    with caplog.at_level(logging.INFO, logger="vlp"):
        pretrain(load_config(DEMO, ["train.max_steps=3"]), output_dir=run, resume=True)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"--resume: {run / 'checkpoints' / 'step_2'} is unreadable (model.safetensors:")
               and m.endswith(f"resuming from the previous complete checkpoint {run / 'checkpoints' / 'step_1'}")
               for m in messages), messages
    assert f"resumed from {run / 'checkpoints' / 'step_1'} at step 1" in messages
    assert [r["step"] for r in _records(run) if "loss" in r][-2:] == [2, 3]  # steps 2 and 3 run again from step 1

    for step in (2, 3):  # every checkpoint unreadable: an error, not a silent fresh start that would prune them
        (run / "checkpoints" / f"step_{step}" / "trainer_state.pt").write_bytes(b"not a zip")
    with pytest.raises(UserError, match=r"none of the 2 checkpoints in .* can be read \(newest .*step_3: trainer_state"):
        pretrain(load_config(DEMO, ["train.max_steps=4"]), output_dir=run, resume=True)


def test_a_local_imagefolder_reports_no_download(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from vlp.data.datasets import HFPairs

    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": "a red circle"})
                                                     + "\n" for i in range(3)))
    capfd.readouterr()
    pairs = HFPairs(tmp_path, lambda image: image, cache_dir=tmp_path / "cache")
    out, err = capfd.readouterr()
    assert len(pairs) == 3
    assert "Downloading" not in out + err and "Generating" not in out + err, out + err
