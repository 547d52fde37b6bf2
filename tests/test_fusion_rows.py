"""Fusion blocks computing only what is read: ``pooled_only`` (the last layer's [CLS] rows) and
``image_index`` (text rows sharing g distinct images by index), against the full computation."""

from __future__ import annotations

import pytest
import torch
from fusion_cases import BLOCK_NAMES, DIM, B, _block, _inputs
from torch import Tensor

from vlp.types import FusionOutput


@pytest.mark.parametrize("grad_checkpointing", [False, True])
@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_pooled_only_equals_full_pooled_output_and_gradients(name: str, grad_checkpointing: bool) -> None:
    """pooled_only computes only the last layer's [CLS] rows: same pooled output and same gradients as the
    full pass (the only thing ITM reads), with a [b, 1, d] text state."""
    block = _block(name).train()
    block.set_grad_checkpointing(grad_checkpointing)
    text, image, text_mask, image_mask = _inputs()
    head = torch.randn(block.out_dim, generator=torch.Generator().manual_seed(3))

    def run(pooled_only: bool) -> tuple[Tensor, FusionOutput, dict[str, Tensor]]:
        block.zero_grad()
        out = block(text, image, text_mask, image_mask, pooled_only=pooled_only)
        (out.pooled @ head).sum().backward()
        return out.pooled.detach(), out, {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}

    full_pooled, full, full_grads = run(False)
    part_pooled, part, part_grads = run(True)
    torch.testing.assert_close(part_pooled, full_pooled, atol=1e-5, rtol=1e-5)
    assert part.text.shape == (B, 1, DIM)
    torch.testing.assert_close(part.text[:, 0], full.text[:, 0], atol=1e-5, rtol=1e-5)
    assert part_grads.keys() == full_grads.keys() and len(full_grads) > 0
    for param_name, grad in full_grads.items():
        torch.testing.assert_close(part_grads[param_name], grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cached", [False, True])
def test_one_way_image_index_equals_per_row_images(cached: bool) -> None:
    """image_index pairs text rows with g distinct images (keys/values projected once per image, optionally
    cached): the same text states, pooled output and gradients as copying each row's image."""
    block = _block("one_way").train()
    text, image, text_mask, image_mask = _inputs()
    index = torch.tensor([2, 0, 2])
    distinct = image.clone().requires_grad_(True)
    per_row = distinct[index]
    full = block(text, per_row, text_mask, image_mask[index])
    kv = block.image_kv(distinct) if cached else None
    shared = block(text, distinct, text_mask, image_mask, image_kv=kv, image_index=index)
    torch.testing.assert_close(shared.text, full.text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.pooled, full.pooled, atol=1e-5, rtol=1e-5)
    assert shared.image is distinct
    head = torch.randn(DIM, generator=torch.Generator().manual_seed(4))
    full_grads = torch.autograd.grad((full.pooled @ head).sum(), [distinct, *block.parameters()], allow_unused=True)
    shared_grads = torch.autograd.grad((shared.pooled @ head).sum(), [distinct, *block.parameters()],
                                       allow_unused=True)
    for a, b in zip(shared_grads, full_grads):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="image_index"):
        block(text, distinct, text_mask, image_mask, image_index=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="update_image=False"):
        _block("co_attention")(text, distinct, text_mask, image_mask, image_index=index)
