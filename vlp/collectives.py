"""Collectives over the default process group, the one home of every cross-rank gather and reduction.

Each helper works the same with or without a group: alone (or with world size 1) a gather is the identity
and a reduction a copy, so losses, objectives, evaluation and the trainer call them unconditionally. This
module imports nothing of vlp, so every layer may use it.

Tensor gathers need the same shape on all ranks (use ``drop_last=True`` in the data loader), as open_clip
and ALBEF assume: the gathered layout is rank 0's rows, then rank 1's, and so on.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["rank_and_world", "is_main", "barrier", "gather_with_grad", "gather_no_grad", "gather_objects",
           "all_reduce_mean", "mean_over_ranks", "sync_gradients", "shard_rows", "gather_shards"]


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


def is_main() -> bool:
    """True on rank 0, and in a process without a group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a group)."""
    if dist.is_initialized():
        dist.barrier()


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


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (tensors and plain types, as ``torch.load(weights_only=True)`` accepts), in rank
    order; a collective. ``[value]`` without a group."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    # all_gather_object's own pickling of tensors fails to load in this torch: send torch.save bytes instead
    buffer = io.BytesIO()
    torch.save(value, buffer)
    payloads: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(payloads, buffer.getvalue())
    return [torch.load(io.BytesIO(payload), weights_only=True) for payload in payloads]


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The element-wise mean of ``tensor`` over all ranks, as a new tensor (the input is not modified).

    Sums then divides, since gloo has no AVG reduction. Without a group: a detached copy.
    """
    result = tensor.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
        result /= dist.get_world_size()
    return result


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value averaged over the ranks (one all-reduce; every rank must pass the same keys)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1) or not values:
        return values
    keys = sorted(values)
    mean = all_reduce_mean(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device))
    return {**values, **dict(zip(keys, mean.tolist()))}


@torch.no_grad()
def sync_gradients(parameters: Iterable[nn.Parameter], bucket_elements: int = 1 << 24) -> None:
    """Average every ``.grad`` over the ranks of the default process group, in flat buckets.

    The gradient-cache step runs several backward passes outside DistributedDataParallel's ``forward``,
    so DDP's hooks stay idle and this does their work once at the end of the micro-batch. Gradients of
    earlier micro-batches are already equal on all ranks, and averaging leaves them unchanged. Every rank
    runs the same code path, so the same parameters hold a gradient everywhere. No-op when alone."""
    _, world = rank_and_world()
    if world == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    by_type: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for grad in grads:
        by_type.setdefault((grad.dtype, grad.device), []).append(grad)
    for group in by_type.values():
        buckets: list[list[Tensor]] = [[]]
        filled = 0
        for grad in group:
            if filled >= bucket_elements:
                buckets.append([])
                filled = 0
            buckets[-1].append(grad)
            filled += grad.numel()
        for bucket in buckets:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)  # SUM: gloo has no AVG
            flat /= world
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g))


def shard_rows(total: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous block of ``range(total)``; block sizes differ by at most one."""
    return range(rank * total // world, (rank + 1) * total // world)


def gather_shards(local: Tensor, total: int) -> Tensor:
    """Every rank's block (``shard_rows``) of a [total, ...] tensor, concatenated in order (no gradient).

    Blocks are padded to the largest for the all-gather, then the padding is dropped.
    """
    rank, world = rank_and_world()
    if world == 1:
        return local
    sizes = [len(shard_rows(total, r, world)) for r in range(world)]
    if local.shape[0] != sizes[rank]:
        raise ValueError(f"rank {rank} holds {local.shape[0]} rows; its block of {total} has {sizes[rank]}")
    padded = F.pad(local, (*([0, 0] * (local.dim() - 1)), 0, max(sizes) - sizes[rank]))
    gathered = gather_no_grad(padded)
    return torch.cat([gathered[r * max(sizes):r * max(sizes) + size] for r, size in enumerate(sizes)])
