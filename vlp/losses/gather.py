"""Cross-rank gathers for losses that compare every sample with every other rank's samples.

All ranks must pass tensors of the same shape (use ``drop_last=True`` in the data loader), as
open_clip and ALBEF assume: the gathered layout is rank 0's rows, then rank 1's, and so on.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["gather_with_grad", "gather_no_grad", "rank_and_world"]


def _all_gather_single(out: Tensor, x: Tensor) -> None:
    # Recent torch renamed the tensor-output collectives (the old names warn); older releases lack the new.
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x)


def _reduce_scatter_single(out: Tensor, x: Tensor) -> None:
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, x)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_rows(x: Tensor, world: int) -> Tensor:
    x = x.contiguous()
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the summed gradient of its own rows.

    Every rank differentiates its own copy of the gathered tensor, so the gradient that belongs to
    rank r's rows is spread over all ranks; a reduce-scatter (sum) brings it home. When each rank
    computes the same global loss this gives W x the single-process gradient on every rank, and
    DDP's averaging over W ranks brings it back to exactly the single-process gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        _, world = rank_and_world()
        ctx.world = world
        return _gather_rows(x, world)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        grad_output = grad_output.contiguous()
        grad_input = grad_output.new_empty((grad_output.shape[0] // ctx.world, *grad_output.shape[1:]))
        _reduce_scatter_single(grad_input, grad_output)
        return grad_input


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate every rank's ``x`` along dim 0, with gradient flowing back to each rank's slice.

    Identity outside a process group or with world size 1.
    """
    _, world = rank_and_world()
    if world == 1:
        return x
    out: Tensor = _GatherWithGrad.apply(x)
    return out


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate every rank's ``x`` along dim 0, detached (ids, momentum features). Identity when alone."""
    _, world = rank_and_world()
    if world == 1:
        return x.detach()
    return _gather_rows(x.detach(), world)
