"""objective.patch_dropout (FLIP): the requested number of patches in training, all in eval and in the
momentum encoder, timm's and open_clip's own modules and results, and the gradient-cache replay drawing
the same masks in both passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from vlp.config import ObjectiveConfig
from vlp.config.schema import ImageEncoderConfig
from vlp.encoders import ImageEncoder, build_image_encoder
from vlp.encoders.patch_dropout import set_patch_dropout
from vlp.errors import ConfigError
from vlp.models import VLPModel
from vlp.objectives import PretrainObjective
from vlp.types import EncoderOutput

ROOT = Path(__file__).resolve().parents[1]
TINY: dict[str, Any] = {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "num_heads": 2}
TIMM: dict[str, Any] = {"type": "timm", "name": "vit_tiny_patch16_224", "image_size": 32,
                        "options": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "reg_tokens": 2}}


def _encoder(**fields: Any) -> ImageEncoder:
    torch.manual_seed(0)
    return build_image_encoder(ImageEncoderConfig(**{**TINY, **fields}))


def _images(n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("prob", [0.5, 0.75, 0.99])
def test_native_vit_keeps_the_class_token_and_the_requested_count(prob: float) -> None:
    encoder = _encoder(type="vit", depth=0)  # embeddings + final norm: every output row is one input token
    images = _images()
    full = encoder.eval()(images).tokens
    set_patch_dropout(encoder, prob)
    out = encoder.train()(images).tokens
    keep = max(1, int(16 * (1 - prob)))
    assert out.shape == (4, 1 + keep, 32) and full.shape == (4, 17, 32)
    torch.testing.assert_close(out[:, 0], full[:, 0])  # the class token is never dropped
    for row in range(4):  # the kept tokens are distinct patches of this image
        match = (out[row, 1:, None] - full[row, None, 1:]).abs().amax(-1) < 1e-6
        assert match.sum(1).eq(1).all() and match.any(0).sum() == keep
    assert encoder.eval()(images).tokens.shape == (4, 17, 32)  # evaluation sees every patch
    set_patch_dropout(encoder, 0.0)
    torch.testing.assert_close(encoder.train()(images).tokens, full)


def test_timm_vit_equals_timm_with_patch_drop_rate() -> None:
    import timm

    encoder = _encoder(**TIMM)
    set_patch_dropout(encoder, 0.5)
    options = {k: v for k, v in TIMM["options"].items()}
    reference = timm.create_model(TIMM["name"], pretrained=False, num_classes=0, img_size=32, patch_drop_rate=0.5,
                                  **options)
    reference.load_state_dict(encoder.model.state_dict())
    images = _images()
    torch.manual_seed(3)
    ours = encoder.train()(images)
    torch.manual_seed(3)
    theirs = reference.train().forward_features(images)
    assert ours.tokens.shape == (4, 3 + 8, 32)  # class + 2 register tokens kept, 8 of 16 patches
    torch.testing.assert_close(ours.tokens, theirs)
    assert encoder.eval()(images).tokens.shape == (4, 3 + 16, 32)


@pytest.mark.parametrize("pooled_only", [False, True])
def test_open_clip_vit_equals_open_clip_with_patch_dropout(pooled_only: bool) -> None:
    encoder = _encoder(type="open_clip")
    reference = _encoder(type="open_clip", options={"patch_dropout": 0.5})  # open_clip's own vision_cfg option
    reference.load_state_dict(encoder.state_dict())
    set_patch_dropout(encoder, 0.5)
    images = _images()
    torch.manual_seed(3)
    ours = encoder.train()(images, pooled_only=pooled_only)
    torch.manual_seed(3)
    theirs = reference.visual.train()(images)  # open_clip's VisionTransformer.forward
    torch.testing.assert_close(ours.pooled, theirs)
    if not pooled_only:
        assert ours.tokens.shape == (4, 1 + 8, 32)
    assert encoder.eval()(images).tokens.shape == (4, 17, 32)


def test_open_clip_timm_trunk_uses_timm_patch_dropout() -> None:
    # open_clip builds a timm trunk at the timm model's own size (224 here), whatever image_size says
    encoder = _encoder(type="open_clip", image_size=224,
                       options={"timm_model_name": "vit_tiny_patch16_224", "timm_pool": "", "embed_dim": 16})
    images = _images(2, 224)
    set_patch_dropout(encoder, 0.5)
    assert encoder.train()(images).tokens.shape == (2, 1 + 98, 192)
    assert encoder.eval()(images).tokens.shape == (2, 1 + 196, 192)


def test_unsupported_towers_and_values_fail_in_one_line() -> None:
    class Plain(ImageEncoder):
        def forward(self, images: torch.Tensor) -> EncoderOutput:  # pragma: no cover - never called
            raise AssertionError

    with pytest.raises(ConfigError, match="has no patch dropout"):
        set_patch_dropout(Plain(), 0.5)
    set_patch_dropout(Plain(), 0.0)  # nothing to switch off
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\)"):
        set_patch_dropout(_encoder(type="vit"), 1.0)
    from vlp.config import load_config

    with pytest.raises(ConfigError, match="objective.patch_dropout"):
        load_config(ROOT / "configs/pretrain/demo_tiny.yaml", ["objective.patch_dropout=1.5"])


def _model() -> VLPModel:
    torch.manual_seed(0)
    return VLPModel.from_config(ROOT / "configs/models/albef_base_tiny.yaml")


def _batch(model: VLPModel, n: int) -> dict[str, torch.Tensor]:
    words = ["red", "blue", "circle", "square", "left", "right", "a", "the"]
    captions = [" ".join(words[(3 * i + j) % len(words)] for j in range(2 + i % 4)) for i in range(n)]
    tokens = model.tokenizer(captions, max_length=model.config.text.max_length)
    return {"images": _images(n), "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def test_momentum_encoder_and_evaluation_see_every_patch() -> None:
    model = _model()
    objective = PretrainObjective(model, ObjectiveConfig(itm_weight=0.0, momentum=0.9, patch_dropout=0.75)).train()
    images = _images()
    assert model.image_encoder(images).tokens.shape[1] == 1 + 4
    assert objective.momentum is not None and objective.momentum.training
    assert objective.momentum["image_encoder"](images).tokens.shape[1] == 17
    assert model.eval().image_encoder(images).tokens.shape[1] == 17


def _step(model: VLPModel, config: ObjectiveConfig, batch: dict[str, torch.Tensor], chunk: int,
          force: bool = False) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    objective = PretrainObjective(model, config, chunk_size=chunk).train()
    torch.manual_seed(7)  # the patch masks
    objective.training_step_chunked(batch) if force else objective.training_step(batch)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_cache_replays_the_patch_masks() -> None:
    model = _model()
    config = ObjectiveConfig(itm_weight=0.0, patch_dropout=0.5)
    batch = _batch(model, 16)
    # one chunk through the gradient-cache path equals the plain step only if pass 2 replays pass 1's masks
    full, one = _step(model, config, batch, chunk=0), _step(model, config, batch, chunk=16, force=True)
    assert full.keys() == one.keys()
    for name, grad in full.items():
        torch.testing.assert_close(one[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    # chunks of 4: each chunk's re-encoding (pass 2) draws the masks of its no-grad encoding (pass 1)
    seen: list[torch.Tensor] = []
    hook = model.image_encoder.register_forward_hook(lambda module, args, out: seen.append(out.pooled.detach()))
    try:
        _step(model, config, batch, chunk=4)
    finally:
        hook.remove()
    assert len(seen) == 8
    for first, second in zip(seen[:4], seen[4:]):
        torch.testing.assert_close(second, first, atol=1e-6, rtol=0)
    with torch.no_grad():  # the masks are real: all patches give other embeddings
        every_patch = model.eval().image_encoder(batch["images"][:4]).pooled
    assert not torch.allclose(every_patch, seen[0], atol=1e-3)
