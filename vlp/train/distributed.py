"""Process groups from torchrun's environment, and DDP / FSDP2 wrapping.

``init_distributed`` reads the variables that ``torchrun`` sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``); without ``WORLD_SIZE`` it is a no-op that describes a single process.
NCCL drives CUDA devices and gloo the CPU. The helpers below work the same with or without a group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from vlp.errors import ConfigError, UserError

__all__ = [
    "DistInfo",
    "init_distributed",
    "is_main",
    "barrier",
    "all_reduce_mean",
    "cleanup",
    "default_block_types",
    "wrap_model",
]

_REQUIRED_ENV = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global ``rank``, ``local_rank`` on its node, ``world_size``, and its ``device``."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device: unknown device '{device}'; known: auto, cpu, cuda")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("train.device: 'cuda' was requested but no CUDA device is available")
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {local_rank} has no GPU: only {torch.cuda.device_count()} visible")
    return torch.device("cuda", local_rank)


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}: expected an integer, got '{value}'") from None


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment, or describe a single process.

    ``device`` is ``train.device``: ``auto`` takes GPU ``LOCAL_RANK`` when CUDA is available, else the CPU.
    Calling it again after the group exists returns the same description.
    """
    if "WORLD_SIZE" not in os.environ:
        return DistInfo(rank=0, local_rank=0, world_size=1, device=_resolve_device(device, 0))
    missing = [name for name in _REQUIRED_ENV if name not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun")
    rank, local_rank, world_size = _env_int("RANK"), _env_int("LOCAL_RANK"), _env_int("WORLD_SIZE")
    resolved = _resolve_device(device, local_rank)
    if not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
            # device_id binds the communicator to this GPU up front (no guessing at the first collective).
            dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=resolved)
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=resolved)


def is_main() -> bool:
    """True on rank 0, and in a process without a group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a group)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The element-wise mean of ``tensor`` over all ranks, as a new tensor (the input is not modified).

    Sums then divides, since gloo has no AVG reduction. Without a group: a detached copy.
    """
    result = tensor.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
        result /= dist.get_world_size()
    return result


def cleanup() -> None:
    """Leave the process group, if one exists."""
    if dist.is_initialized():
        dist.destroy_process_group()


def default_block_types() -> tuple[type[nn.Module], ...]:
    """The transformer block classes that FSDP shards one by one: vlp's own, timm's ViT, open_clip's and BERT's."""
    from open_clip.transformer import ResidualAttentionBlock
    from timm.models.vision_transformer import Block
    from transformers.models.bert.modeling_bert import BertLayer

    from vlp.layers.blocks import TransformerBlock

    return (TransformerBlock, Block, ResidualAttentionBlock, BertLayer)


def wrap_model(model: nn.Module, info: DistInfo, fsdp: bool = False,
               block_types: tuple[type[nn.Module], ...] | None = None) -> nn.Module:
    """Wrap ``model`` for data-parallel training; a single process gets ``model`` back unchanged.

    ``fsdp=False``: ``DistributedDataParallel`` (``find_unused_parameters=False``, static graph off). Gradients
    are only synchronized for backward passes through the wrapper's ``forward``.
    ``fsdp=True``: FSDP2 ``fully_shard`` on every module of ``block_types`` (default
    ``default_block_types()``), innermost first, then on the root; parameters become DTensors, so build the
    optimizer after wrapping. The model must already be on ``info.device``.
    """
    if not info.distributed:
        return model
    if not dist.is_initialized():
        raise UserError("wrap_model: world_size > 1 but no process group; call init_distributed() first")
    if not fsdp:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False,
                                       static_graph=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    types = block_types if block_types is not None else default_block_types()
    # Children before parents: a block nested in another block (rare) must be sharded first.
    blocks = [module for module in model.modules() if isinstance(module, types) and module is not model]
    for block in reversed(blocks):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
