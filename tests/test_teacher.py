"""objective.distill_from: a frozen teacher checkpoint's ITC logits as soft targets. The loss equals
open_clip's DistillClipLoss on the same embeddings (the teacher's re-tokenized captions and re-transformed
images, its own logit scale); the gradient-cache step gives the plain step's gradients; the teacher stays
frozen; SigLIP is refused; and a student trained on the distill term alone moves towards the teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from vlp.config import ObjectiveConfig, load_config
from vlp.errors import ConfigError, UserError
from vlp.models import VLPModel
from vlp.objectives import PretrainObjective

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red circle left of a blue square", "the green triangle", "two small shapes at the top",
            "a blue circle", "red square on the right", "a big green circle", "the triangle is blue", "shapes"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An open_clip dual encoder with the CLIP BPE tokenizer, at 48 px with its own normalization: nothing
    about its inputs matches the student's."""
    data = yaml.safe_load((ROOT / "configs/models/clip_base_tiny.yaml").read_text())["model"]
    data["image"] |= {"image_size": 48, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    data["temperature"] = 0.05
    torch.manual_seed(1)
    teacher = VLPModel.from_config(data)
    directory = tmp_path_factory.mktemp("teacher") / "ckpt"
    teacher.save_pretrained(directory)
    return directory


def _student(preset: str = "albef_base_tiny") -> VLPModel:
    torch.manual_seed(0)
    return VLPModel.from_config(ROOT / "configs" / "models" / f"{preset}.yaml").train()


def _batch(model: VLPModel, n: int = 8) -> tuple[dict[str, Any], torch.Tensor]:
    pixels = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    encoder = model.image_encoder
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    tokens = model.tokenizer(captions, max_length=model.config.text.max_length)
    batch = {"images": TF.normalize(pixels, list(encoder.mean), list(encoder.std)), "captions": captions,
             "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    return batch, pixels


@pytest.mark.parametrize("teacher_weight", [1.0, 0.5])
def test_loss_equals_open_clip_distill_clip_loss(teacher_dir: Path, teacher_weight: float) -> None:
    from open_clip.loss import DistillClipLoss

    student = _student()
    config = ObjectiveConfig(itm_weight=0.0, distill_from=str(teacher_dir), teacher_weight=teacher_weight)
    objective = PretrainObjective(student, config).train()
    batch, pixels = _batch(student)
    out = objective.training_step(batch)
    teacher = VLPModel.from_pretrained(teacher_dir)
    with torch.no_grad():
        image = student.encode_image(batch["images"])
        text = student.encode_text(batch["input_ids"], batch["attention_mask"])
        resized = TF.resize(pixels, [48, 48], interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
        teacher_image = teacher.encode_image(TF.normalize(resized, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]))
        teacher_text = teacher.encode_text(**teacher.tokenizer(batch["captions"], max_length=32))
        contrastive, distill = DistillClipLoss()(image, text, student.logit_scale(), teacher_image, teacher_text,
                                                 teacher.logit_scale())
    assert float(teacher.logit_scale()) == pytest.approx(20.0) and float(student.logit_scale()) != pytest.approx(20.0)
    torch.testing.assert_close(out.terms["itc"], contrastive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.terms["distill"], distill, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.total, contrastive + teacher_weight * distill, atol=1e-5, rtol=1e-5)
    assert objective.teacher is not None and not objective.teacher.training  # train() leaves the teacher in eval
    assert all(not p.requires_grad and p.grad is None for p in objective.teacher.parameters())
    assert student.image_proj.weight.grad is not None


def test_gradient_cache_step_equals_the_plain_step(teacher_dir: Path) -> None:
    student = _student()
    batch, _ = _batch(student, 16)
    results = []
    for chunk in (0, 4):
        student.zero_grad(set_to_none=True)
        objective = PretrainObjective(student, ObjectiveConfig(itm_weight=0.0, distill_from=str(teacher_dir)),
                                      chunk_size=chunk)
        out = objective.training_step(batch)
        results.append((out, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (chunked, chunked_grads) = results
    for key in ("itc", "distill"):
        torch.testing.assert_close(chunked.terms[key], plain.terms[key], atol=1e-5, rtol=1e-5)
    assert plain_grads.keys() == chunked_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_distillation_learns_the_teachers_similarities(teacher_dir: Path) -> None:
    student = _student()
    objective = PretrainObjective(student, ObjectiveConfig(itc_weight=0.0, itm_weight=0.0,
                                                           distill_from=str(teacher_dir)))
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    batch, _ = _batch(student)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        losses.append(float(objective.training_step(batch).terms["distill"]))
        optimizer.step()
    # the floor is the teacher's own entropy (both directions); the student closes most of the gap to it
    teacher = objective.teacher
    assert teacher is not None
    with torch.no_grad():
        t_image, t_text = teacher.embeddings(batch["images"], batch["captions"])
        logits = teacher.model.logit_scale() * t_image @ t_text.T
        floor = sum(float(-(p * p.log()).sum(1).mean()) for p in (logits.softmax(1), logits.T.softmax(1))) / 2
    assert losses[-1] - floor < 0.1 * (losses[0] - floor), (losses[0], losses[-1], floor)


def test_siglip_and_missing_teachers_fail_in_one_line(teacher_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="softmax-ITC student"):
        PretrainObjective(_student("siglip_base_tiny"), ObjectiveConfig(itm_weight=0.0, distill_from=str(teacher_dir)))
    _student("siglip_base_tiny").save_pretrained(tmp_path / "siglip")
    with pytest.raises(ConfigError, match="the teacher is a SigLIP model"):
        PretrainObjective(_student(), ObjectiveConfig(itm_weight=0.0, distill_from=str(tmp_path / "siglip")))
    with pytest.raises(UserError, match="objective.distill_from: checkpoint directory not found"):
        PretrainObjective(_student(), ObjectiveConfig(distill_from=str(tmp_path / "nowhere")))
    run = yaml.safe_load((ROOT / "configs/pretrain/clip_cc3m_tiny.yaml").read_text())
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**run, "model": "siglip_base_tiny"}))
    with pytest.raises(ConfigError, match="objective.distill_from.*needs the softmax ITC"):
        load_config(tmp_path / "run.yaml", [f"objective.distill_from={teacher_dir}"])
    with pytest.raises(ConfigError, match="objective.teacher_weight"):
        load_config(ROOT / "configs/pretrain/clip_cc3m_tiny.yaml", ["objective.teacher_weight=-1"])
