"""Shared cases of the fusion tests: the three block forms with random weights and padded inputs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlp.fusion import DualStreamFusion, SingleStreamFusion

__all__ = ["BLOCK_NAMES", "DIM", "HEADS", "B", "TEXT_LEN", "IMAGE_LEN", "Fusion", "_block", "_blocks", "_inputs", "_mask",
           "_randomize"]

DIM, HEADS, B, TEXT_LEN, IMAGE_LEN = 32, 4, 3, 7, 5
TEXT_LENGTHS, IMAGE_LENGTHS = [7, 4, 2], [5, 5, 3]

Fusion = SingleStreamFusion | DualStreamFusion


def _blocks() -> dict[str, Fusion]:
    torch.manual_seed(0)
    return {
        "single_stream": SingleStreamFusion(DIM, 2, HEADS),
        "co_attention": DualStreamFusion(DIM, 2, HEADS, update_image=True),
        "one_way": DualStreamFusion(DIM, 2, HEADS, update_image=False),
    }


BLOCK_NAMES = list(_blocks())


def _block(name: str) -> Fusion:
    block = _blocks()[name].eval()
    _randomize(block)
    return block


def _randomize(module: nn.Module, seed: int = 0) -> None:
    """Random weights (LayerNorms included) so that comparisons do not pass on trivial parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        for sub in module.modules():
            if isinstance(sub, nn.LayerNorm):
                sub.weight.add_(1.0)


def _mask(lengths: list[int], n: int) -> Tensor:
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def _inputs(seed: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, TEXT_LEN, DIM, generator=gen), torch.randn(B, IMAGE_LEN, DIM, generator=gen),
            _mask(TEXT_LENGTHS, TEXT_LEN), _mask(IMAGE_LENGTHS, IMAGE_LEN))
