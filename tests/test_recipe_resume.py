"""Retrieval fine-tuning with patch dropout, a teacher and a resolution change survives kill + --resume
bit-identically, and its checkpoints are at the new resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from vlp.config import load_config
from vlp.models import VLPModel
from vlp.train.finetune import finetune_retrieval

ROOT = Path(__file__).resolve().parents[1]


class Killed(Exception):
    pass


def test_patch_dropout_teacher_and_new_resolution_resume_exactly(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    VLPModel.from_config(ROOT / "configs/models/albef_base_tiny.yaml").save_pretrained(tmp_path / "init")
    torch.manual_seed(1)
    VLPModel.from_config(ROOT / "configs/models/clip_base_tiny.yaml").save_pretrained(tmp_path / "teacher")
    run = yaml.safe_load((ROOT / "configs/finetune/retrieval_tiny.yaml").read_text())
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**run, "model": "albef_base_tiny"}))  # the --init model
    config = load_config(tmp_path / "run.yaml", [
        "train.max_steps=4", "train.checkpoint_every=2", "eval.every=-1", "objective.patch_dropout=0.5",
        f"objective.distill_from={tmp_path / 'teacher'}", "train.init_image_size=48"])
    straight = finetune_retrieval(config, tmp_path / "init", output_dir=tmp_path / "straight")
    import vlp.train.loop as loop

    real_step = loop._optimizer_step

    def dying_step(config, module, optimizer, state):  # type: ignore[no-untyped-def]
        if state.step == 2:
            raise Killed
        return real_step(config, module, optimizer, state)

    monkeypatch.setattr(loop, "_optimizer_step", dying_step)
    with pytest.raises(Killed):
        finetune_retrieval(config, tmp_path / "init", output_dir=tmp_path / "resumed")
    monkeypatch.setattr(loop, "_optimizer_step", real_step)
    finetune_retrieval(config, tmp_path / "init", output_dir=tmp_path / "resumed", resume=True)
    a = safetensors.torch.load_file(str(straight / "final" / "model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    assert a["image_encoder.pos_embed"].shape == (1, 1 + 36, 32)  # 48 px / patch 8
    saved = yaml.safe_load((straight / "final" / "config.yaml").read_text())
    assert saved["model"]["image"]["image_size"] == 48
    lines = [yaml.safe_load(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert any("distill" in line for line in lines)
