"""open_clip habits in a vlp run: train.epochs instead of max_steps, zero-shot evaluation during training,
TensorBoard scalars beside metrics.jsonl."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from vlp.config import load_config
from vlp.data.synthetic import write_synthetic
from vlp.errors import ConfigError, UserError
from vlp.train.loop import pretrain
from vlp.train.schedule import steps_for_epochs

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs/pretrain/demo_tiny.yaml"


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_epochs_set_the_number_of_steps(tmp_path: Path) -> None:
    # 32 samples / batch 8 = 4 batches an epoch; 3 epochs with 2 micro-batches a step = 6 optimizer steps
    config = load_config(DEMO, ["data.synthetic_train_size=32", "train.epochs=3", "train.grad_accum=2",
                                "train.max_steps=1000", "train.checkpoint_every=0"])
    run = pretrain(config, output_dir=tmp_path / "run")
    steps = [r for r in _records(run) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in steps] == [0, 0, 1, 1, 2, 2]  # epochs counted from 0
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 6
    assert steps_for_epochs(1, range(5), 2) == 3  # a partial accumulation group is a step
    with pytest.raises(ConfigError, match="train.epochs: the training data has no known size"):
        steps_for_epochs(1, iter(()), 1)
    with pytest.raises(ConfigError, match="'train.epochs' = -1"):
        load_config(DEMO, ["train.epochs=-1"])


def test_zeroshot_evaluation_during_training(tmp_path: Path) -> None:
    paths = write_synthetic(tmp_path / "data", train_size=2, test_size=40, image_size=32)
    zeroshot = [f"eval.zeroshot={paths['zeroshot']}", f"eval.zeroshot_classes={paths['classes']}",
                f"eval.zeroshot_image_root={tmp_path / 'data'}"]
    config = load_config(DEMO, ["train.max_steps=3", "train.checkpoint_every=0", "eval.every=-1",
                                "eval.zeroshot_every=2", *zeroshot])
    run = pretrain(config, output_dir=tmp_path / "run")
    evaluated = [r for r in _records(run) if "eval/zeroshot/itc_top1" in r]
    assert [r["step"] for r in evaluated] == [2, 3]  # every 2 steps and at the end
    assert not any("eval/itc/img_r1" in r for r in _records(run))  # retrieval stays off (eval.every -1)
    result = json.loads((run / "eval_zeroshot.json").read_text())
    assert evaluated[-1]["eval/zeroshot/itc_top1"] == result["itc_top1"]
    assert evaluated[-1]["eval/zeroshot/itc_top5"] == result["itc_top5"] == 100.0  # five shape classes

    # the same number as `vlp eval zeroshot` on the final checkpoint with the same prompts
    from vlp.data.vqa_data import load_zeroshot
    from vlp.eval.zeroshot import default_templates, evaluate_zeroshot
    from vlp.models import VLPModel

    model = VLPModel.from_pretrained(run / "final")
    split = load_zeroshot(paths["zeroshot"], tmp_path / "data", paths["classes"])
    direct = evaluate_zeroshot(model, split, model.image_transform(train=False), list(split.classes),
                               default_templates(model, split.classes), progress=False)
    assert direct["itc_top1"] == pytest.approx(result["itc_top1"])
    assert result["num_images"] == len(split.labels) > 0

    with pytest.raises(ConfigError, match="eval.zeroshot needs the JSON list of its class names"):
        load_config(DEMO, [f"eval.zeroshot={paths['zeroshot']}"])
    with pytest.raises(UserError, match="eval.zeroshot: not found: nowhere.json"):
        pretrain(load_config(DEMO, ["eval.zeroshot=nowhere.json", f"eval.zeroshot_classes={paths['classes']}"]),
                 output_dir=tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


def test_tensorboard_mirrors_metrics_jsonl(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = pretrain(load_config(DEMO, ["train.max_steps=3", "train.tensorboard=true"]), output_dir=tmp_path / "run")
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    records = [r for r in _records(run) if "loss" in r]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]
    assert {"lr", "itc", "itm", "samples_per_s", "lr_scaled"} <= set(events.Tags()["scalars"])


def test_tensorboard_without_the_package_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    with pytest.raises(UserError, match=r"train.tensorboard: the tensorboard package is not installed; "
                                        r"pip install 'vlp\[tensorboard\]'"):
        pretrain(load_config(DEMO, ["train.max_steps=1", "train.tensorboard=true"]), output_dir=tmp_path / "run")


def test_gradient_norm_and_clipping_are_logged_and_coupled_clipping_is_named(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert load_config(DEMO).optim.grad_clip == 0.0  # no clipping by default, as ALBEF, BLIP and open_clip
    with caplog.at_level("WARNING", logger="vlp"):
        run = pretrain(load_config(DEMO), output_dir=tmp_path / "free")
    steps = [r for r in _records(run) if "loss" in r]
    assert all(r["grad_norm"] > 0 and r["grad_clipped_fraction"] == 0.0 for r in steps)
    assert "optim.grad_clip" not in caplog.text
    with caplog.at_level("WARNING", logger="vlp"):
        run = pretrain(load_config(DEMO, ["optim.grad_clip=1e-6"]), output_dir=tmp_path / "clipped")
    steps = [r for r in _records(run) if "loss" in r]
    assert all(r["grad_norm"] > 1e-6 and r["grad_clipped_fraction"] == 1.0 for r in steps)
    assert "optim.grad_clip 1e-06 clips the global gradient norm" in caplog.text  # ITC + ITM: the warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="vlp"):
        pretrain(load_config(DEMO, ["optim.grad_clip=1e-6", "objective.itm_weight=0"]),
                 output_dir=tmp_path / "itc_only")
    assert "optim.grad_clip" not in caplog.text  # one loss: clipping couples nothing
