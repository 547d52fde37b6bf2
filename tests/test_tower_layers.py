"""Partial locking (train.freeze_*_unlocked_*) and layer-wise lr decay (optim.*_layer_decay) for every tower type."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay

from vlp.config import load_config
from vlp.config.schema import OptimConfig
from vlp.errors import ConfigError
from vlp.models import VLPModel
from vlp.train.loop import pretrain
from vlp.train.optim import build_optimizer
from vlp.train.tower_layers import lock_tower

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs/pretrain/demo_tiny.yaml"
IMAGE: dict[str, dict[str, Any]] = {
    "vit": {"type": "vit", "image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "num_heads": 2},
    "timm": {"type": "timm", "name": "vit_tiny_patch16_224", "image_size": 32,
             "options": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}},
    "open_clip": {"type": "open_clip", "image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "num_heads": 2,
                  "options": {"embed_dim": 16}},
}
TEXT: dict[str, dict[str, Any]] = {
    "transformer": {"type": "transformer", "width": 32, "depth": 2, "num_heads": 2, "max_length": 16},
    "hf": {"type": "hf", "width": 32, "depth": 2, "num_heads": 2, "max_length": 16},
    "open_clip": {"type": "open_clip", "width": 32, "depth": 2, "num_heads": 2, "max_length": 16,
                  "causal": True, "pooling": "eos", "options": {"embed_dim": 16}},
}
PAIRS = [("vit", "transformer"), ("timm", "hf"), ("open_clip", "open_clip")]


def _model(image: str, text: str) -> VLPModel:
    torch.manual_seed(0)
    return VLPModel.from_config({"image": IMAGE[image], "text": TEXT[text], "fusion": {"type": "none"},
                                 "embed_dim": 16, "itm_head": False}).train()


def _trainable(module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def _timm_last_groups(model: Any, count: int) -> set[str]:
    groups = group_parameters(model, model.group_matcher())
    return {f"model.{name}" for gid in sorted(groups)[-count:] for name in groups[gid]}


# the encoder's parameters left trainable by N - 1 unlocked groups (vlp's projection being the N-th)
EXPECTED_UNLOCKED: dict[tuple[str, int], Any] = {
    ("image/vit", 2): lambda e: {n for n, _ in e.named_parameters() if n.startswith(("blocks.1.", "norm."))},
    ("image/timm", 3): lambda e: _timm_last_groups(e.model, 2),  # timm's groups: blocks.1 and norm apart
    ("image/open_clip", 2): lambda e: {"visual.proj"},  # open_clip's own last group
    ("image/open_clip", 3): lambda e: {"visual.proj", *(n for n, _ in e.named_parameters()
                                                        if n.startswith(("visual.transformer.resblocks.1.",
                                                                         "visual.ln_post.")))},
    ("text/transformer", 2): lambda e: {n for n, _ in e.named_parameters() if n.startswith("blocks.1.")},
    ("text/hf", 2): lambda e: {n for n, _ in e.named_parameters() if n.startswith("model.encoder.layer.1.")},
    ("text/open_clip", 3): lambda e: {"text.text_projection", *(n for n, _ in e.named_parameters()
                                                               if n.startswith(("text.transformer.resblocks.1.",
                                                                                "text.ln_final.")))},
}


@pytest.mark.parametrize("case, unlocked", sorted(EXPECTED_UNLOCKED))
def test_unlocked_groups_follow_open_clip_and_timm(case: str, unlocked: int) -> None:
    side, kind = case.split("/")
    model = _model(kind, "transformer") if side == "image" else _model("vit", kind)
    encoder = model.image_encoder if side == "image" else model.text_encoder
    lock_tower(encoder, unlocked - 1, "key")
    assert _trainable(encoder) == EXPECTED_UNLOCKED[(case, unlocked)](encoder)
    lock_tower(encoder, 0, "key")
    assert not _trainable(encoder)


@pytest.mark.parametrize("image, text", PAIRS)
def test_locked_parameters_get_no_gradient_and_unlocked_ones_do(image: str, text: str) -> None:
    model = _model(image, text)
    config = load_config(DEMO, ["train.freeze_image=true", "train.freeze_image_unlocked_groups=2",
                                "train.freeze_text=true", "train.freeze_text_unlocked_layers=1"])
    from vlp.train.loop import prepare_model

    prepare_model(config, model)
    ids = model.tokenizer(["a red circle", "a blue square at the top left"], max_length=16)
    images = torch.randn(2, 3, 32, 32)
    logits = model.encode_image(images) @ model.encode_text(ids["input_ids"], ids["attention_mask"]).T
    (logits * model.logit_scale()).sum().backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and bool(param.grad.abs().sum() > 0), name
        else:
            assert param.grad is None, name
    trainable = _trainable(model)
    assert {n for n in trainable if n.startswith("text_encoder.")} == set()  # 1 group = the projection only
    assert any(n.startswith("text_proj.") for n in trainable) and any(n.startswith("image_proj.") for n in trainable)
    image_side = {n for n in trainable if n.startswith("image_encoder.")}
    assert image_side and len(image_side) < sum(1 for n, _ in model.image_encoder.named_parameters())


def test_unlocking_needs_a_frozen_tower() -> None:
    with pytest.raises(ConfigError, match="freeze_image_unlocked_groups.*freeze_image: true"):
        load_config(DEMO, ["train.freeze_image_unlocked_groups=2"])
    with pytest.raises(ConfigError, match="optim.image_layer_decay"):
        load_config(DEMO, ["optim.image_layer_decay=0"])


# ------------------------------------------------------------------------------------------ layer-wise decay
def _group_lrs(model: VLPModel, image_decay: float, text_decay: float, lr: float = 1e-3) -> dict[str, float]:
    optim = OptimConfig(lr=lr, image_layer_decay=image_decay, text_layer_decay=text_decay)
    optimizer = build_optimizer(model, optim, lr, "cpu")
    return {name: group["lr"] for group in optimizer.param_groups for name in group["param_names"]}


def test_timm_tower_group_lrs_equal_timms_param_groups_layer_decay() -> None:
    model = _model("timm", "hf")
    lrs = _group_lrs(model, 0.75, 1.0)
    reference = param_groups_layer_decay(model.image_encoder.model, weight_decay=0.02, layer_decay=0.75)
    by_param = {id(p): group["lr_scale"] for group in reference for p in group["params"]}
    for name, param in model.image_encoder.model.named_parameters():
        assert lrs[f"image_encoder.model.{name}"] == pytest.approx(1e-3 * by_param[id(param)], rel=1e-12), name
    assert len(set(by_param.values())) == 3  # stem, 2 blocks (the final norm joins the last one)


def test_native_towers_decay_as_specified_and_the_rest_keeps_the_full_lr() -> None:
    model = _model("vit", "transformer")
    lrs = _group_lrs(model, 0.5, 0.8)
    # depth 2 -> stem 0, blocks 1-2, the final norm with the last block: max_layer 2
    assert lrs["image_encoder.patch_embed.weight"] == pytest.approx(1e-3 * 0.5 ** 2)
    assert lrs["image_encoder.cls_token"] == lrs["image_encoder.pos_embed"] == lrs["image_encoder.patch_embed.weight"]
    assert all(v == pytest.approx(1e-3 * 0.5) for n, v in lrs.items() if n.startswith("image_encoder.blocks.0."))
    assert all(v == pytest.approx(1e-3) for n, v in lrs.items() if n.startswith("image_encoder.blocks.1."))
    assert lrs["image_encoder.norm.weight"] == pytest.approx(1e-3)
    assert lrs["text_encoder.embeddings.weight"] == pytest.approx(1e-3 * 0.8 ** 2)
    assert all(v == pytest.approx(1e-3 * 0.8) for n, v in lrs.items() if n.startswith("text_encoder.blocks.0."))
    others = {n: v for n, v in lrs.items() if not n.startswith(("image_encoder.", "text_encoder."))}
    assert others and all(v == 1e-3 for v in others.values())  # projections, temperature


def test_native_vit_decays_as_timms_vit_of_the_same_depth() -> None:
    native, timm_model = _model("vit", "transformer"), _model("timm", "transformer")
    ours, theirs = _group_lrs(native, 0.7, 1.0), _group_lrs(timm_model, 0.7, 1.0)
    pairs = {"patch_embed.weight": "patch_embed.proj.weight", "cls_token": "cls_token", "pos_embed": "pos_embed",
             "norm.weight": "norm.weight", "blocks.0.norm1.weight": "blocks.0.norm1.weight",
             "blocks.1.norm1.weight": "blocks.1.norm1.weight"}
    for mine, timm_name in pairs.items():
        if f"image_encoder.{mine}" in ours:
            assert ours[f"image_encoder.{mine}"] == pytest.approx(theirs[f"image_encoder.model.{timm_name}"]), mine


def test_open_clip_towers_decay_by_block() -> None:
    model = _model("open_clip", "open_clip")
    lrs = _group_lrs(model, 0.5, 0.5)
    assert lrs["image_encoder.visual.conv1.weight"] == pytest.approx(1e-3 * 0.5 ** 2)
    assert lrs["image_encoder.visual.proj"] == lrs["image_encoder.visual.ln_post.weight"] == pytest.approx(1e-3)
    assert lrs["image_encoder.visual.transformer.resblocks.0.ln_1.weight"] == pytest.approx(1e-3 * 0.5)
    assert lrs["text_encoder.text.token_embedding.weight"] == pytest.approx(1e-3 * 0.5 ** 2)
    assert lrs["text_encoder.text.transformer.resblocks.1.ln_1.weight"] == pytest.approx(1e-3)


TRAIN = ["train.max_steps=3", "train.checkpoint_every=1", "train.keep_last=5", "optim.image_layer_decay=0.6",
         "optim.text_layer_decay=0.8", "train.freeze_image=true", "train.freeze_image_unlocked_groups=2",
         "train.ema_decay=0.7"]


def test_layer_decay_and_locking_in_training_log_and_resume_exactly(tmp_path: Path) -> None:
    straight = pretrain(load_config(DEMO, TRAIN), output_dir=tmp_path / "straight")
    first = json.loads((straight / "metrics.jsonl").read_text().splitlines()[0])
    assert first["image_layer_decay"] == 0.6 and first["text_layer_decay"] == 0.8
    peaks = {k: v for k, v in first.items() if k.startswith("lr_peak/")}
    assert any(k.startswith("lr_peak/image/") for k in peaks) and any(k.startswith("lr_peak/text/") for k in peaks)
    assert max(peaks.values()) == pytest.approx(first["lr_scaled"])
    assert min(v for k, v in peaks.items() if k.startswith("lr_peak/text/")) == pytest.approx(
        first["lr_scaled"] * 0.8)  # albef_base_tiny's text tower: 1 block
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "step_1", resumed / "checkpoints" / "step_1")
    pretrain(load_config(DEMO, TRAIN), output_dir=resumed, resume=True)
    for name in ("final", "final_ema"):
        expected = load_file(str(straight / name / "model.safetensors"))
        got = load_file(str(resumed / name / "model.safetensors"))
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
    start = load_file(str(straight / "checkpoints" / "step_1" / "model.safetensors"))
    final = load_file(str(straight / "final" / "model.safetensors"))
    assert torch.equal(start["image_encoder.patch_embed.weight"], final["image_encoder.patch_embed.weight"])  # locked
