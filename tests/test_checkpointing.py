"""Activation checkpointing at the model level: for every tiny preset (native ViT and text transformer,
open_clip towers, one-way and co-attention dual stream, single stream, no fusion) and for timm + Hugging
Face encoders, one full pretraining step (ITC/SigLIP + ITM + MLM) gives the same gradients (1e-5, fp32,
dropout off) with ``set_grad_checkpointing(True)``, and every part really recomputes in backward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from vlp.config import ObjectiveConfig
from vlp.models import VLPModel
from vlp.objectives import PretrainObjective

ROOT = Path(__file__).resolve().parents[1]
TINY = sorted((ROOT / "configs" / "models").glob("*_tiny.yaml"))
# The encoder types no preset uses: timm's ViT and a random BERT from transformers.
TIMM_HF: dict[str, Any] = {
    "name": "timm_hf_tiny",
    "image": {"type": "timm", "name": "vit_tiny_patch16_224", "image_size": 32,
              "options": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}},
    "text": {"type": "hf", "tokenizer": "synthetic", "width": 32, "depth": 1, "num_heads": 2, "max_length": 30},
    "fusion": {"type": "dual_stream", "depth": 1, "num_heads": 2, "update_image": True},
    "embed_dim": 16, "itm_head": True, "mlm_head": True,
}
MODELS: dict[str, Any] = {**{p.stem: p for p in TINY}, "timm_hf_tiny": TIMM_HF}
CAPTIONS = ["a red circle at the top left", "a blue square in the center", "a green triangle at the bottom",
            "two shapes: a red square at the left and a blue circle at the right", "a small blue circle"]


def _batch(model: VLPModel) -> dict[str, torch.Tensor]:
    size = model.image_encoder.image_size
    tokens = model.tokenizer(CAPTIONS, max_length=model.config.text.max_length)
    images = torch.randn(len(CAPTIONS), 3, size, size, generator=torch.Generator().manual_seed(0))
    return {"images": images, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
            "image_ids": torch.arange(len(CAPTIONS))}


def _count_linear_calls(part: nn.Module | None, counter: list[int]) -> None:
    for module in [] if part is None else part.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_pre_hook(lambda *_: counter.append(1))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_checkpointing_gives_the_same_gradients(name: str) -> None:
    torch.manual_seed(0)
    model = VLPModel.from_config(MODELS[name]).train()
    config = ObjectiveConfig(itm_weight=1.0 if model.itm_head else 0.0, mlm_weight=1.0 if model.mlm_head else 0.0)
    batch = _batch(model)
    parts = {"image": model.image_encoder, "text": model.text_encoder, "fusion": model.fusion}
    calls: dict[str, list[int]] = {key: [] for key in parts}
    for key, part in parts.items():
        _count_linear_calls(part, calls[key])

    def step(enable: bool) -> tuple[dict[str, torch.Tensor], dict[str, int], torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(enable)
        for counter in calls.values():
            counter.clear()
        # the same ITM negatives and MLM masks in both steps
        objective = PretrainObjective(model, config, generator=torch.Generator().manual_seed(1))
        out = objective.training_step(batch)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return grads, {key: len(counter) for key, counter in calls.items()}, out.total

    plain, plain_calls, plain_loss = step(False)
    checkpointed, checkpointed_calls, checkpointed_loss = step(True)
    model.set_grad_checkpointing(False)

    assert plain.keys() == checkpointed.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(checkpointed_loss, plain_loss, atol=1e-6, rtol=0)
    for param_name, grad in plain.items():
        torch.testing.assert_close(checkpointed[param_name], grad, atol=1e-5, rtol=1e-5, msg=param_name)
    for key, part in parts.items():
        blocks = 0 if part is None else sum(1 for m in part.modules() if isinstance(m, nn.Linear))
        if blocks and plain_calls[key] and _has_layers(part):
            # recomputed in backward: checkpointing is really on for this part
            assert checkpointed_calls[key] > plain_calls[key], (key, plain_calls[key], checkpointed_calls[key])


def _has_layers(part: nn.Module | None) -> bool:
    """Whether the part has transformer layers to checkpoint (the ViLT preset's encoders have depth 0)."""
    return part is not None and any(len(m) > 0 for m in part.modules() if isinstance(m, nn.ModuleList))
