"""Process groups from torchrun's environment, and DDP / FSDP2 wrapping.

``init_distributed`` reads the variables that ``torchrun`` sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``); without ``WORLD_SIZE`` it is a no-op that describes a single process.
NCCL drives CUDA devices and gloo the CPU. The helpers below work the same with or without a group; the
collectives themselves live in ``vlp.collectives``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from vlp.errors import ConfigError, UserError

__all__ = [
    "DistInfo",
    "init_distributed",
    "cleanup",
    "default_block_types",
    "wrap_model",
    "rank_seed",
    "restore_rank_rng",
    "resume_position",
    "equal_rows",
    "fsdp_modules",
    "full_state_dicts",
    "optimizer_state",
    "load_optimizer_state",
    "compile_blocks",
    "parallelize",
]

log = logging.getLogger("vlp")

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


def _ddp_parameters() -> set[str]:
    import inspect

    return set(inspect.signature(DistributedDataParallel.__init__).parameters)


def wrap_model(model: nn.Module, info: DistInfo, fsdp: bool = False,
               block_types: tuple[type[nn.Module], ...] | None = None) -> nn.Module:
    """Wrap ``model`` for data-parallel training; a single process gets ``model`` back unchanged.

    ``fsdp=False``: ``DistributedDataParallel`` with ``find_unused_parameters=True``: presets carry heads that
    an objective may not use (an MLM head with ``mlm_weight: 0``; the projections and ITM head during VQA
    fine-tuning), and their parameters must not hold up the gradient all-reduce. (``static_graph=True`` would
    skip the per-step graph walk, but with this torch and vlp's step it left the first step's gradients
    unreduced, so the ranks drifted apart; tests/test_distributed.py compares DDP gradients with one process.)
    ``broadcast_buffers=False``: vlp's buffers are constants or the feature queue, which every rank updates
    identically from gathered features (re-broadcasting a 65536-entry queue every forward would dominate the
    step). Gradients are only synchronized for backward passes through the wrapper's ``forward``.
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
        # torch 2.14 renamed broadcast_buffers (init-time sync stays on under the new name, as we want)
        no_buffer_sync: dict[str, Any] = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _ddp_parameters()
                          else {"broadcast_buffers": False})
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True,
                                       gradient_as_bucket_view=True, **no_buffer_sync)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    types = block_types if block_types is not None else default_block_types()
    # fully_shard rejects 0-d parameters (the learned temperature, SigLIP's bias): they stay replicated,
    # and a hook averages their gradients over the ranks, as DDP would.
    scalars = {param for param in model.parameters() if param.dim() == 0}
    for param in scalars:
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(_average_gradient)
    # Children before parents: a block nested in another block (rare) must be sharded first.
    blocks = [module for module in model.modules() if isinstance(module, types) and module is not model]
    for block in reversed(blocks):
        fully_shard(block, mesh=mesh, ignored_params=scalars)
        if hasattr(block, "forward_with_weights"):  # the fusion stacks call it instead of forward
            register_fsdp_forward_method(block, "forward_with_weights")
    fully_shard(model, mesh=mesh, ignored_params=scalars)
    return model


def _average_gradient(param: Tensor) -> None:
    # Re-averaging an accumulated gradient is harmless: the part from earlier micro-batches is equal everywhere.
    assert param.grad is not None
    dist.all_reduce(param.grad)
    param.grad /= dist.get_world_size()


# ---------------------------------------------------------------------------------------- per-rank state
def rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``'s RNG streams (rank 0 keeps ``seed``): ranks must draw different dropout masks,
    MLM masks and hard negatives, while the model is built from ``seed`` on every rank."""
    return (seed + 1_000_003 * rank) % 2**63


def restore_rank_rng(trainer: dict[str, Any], rank: int, world_size: int, seed: int) -> None:
    """Restore this rank's RNG streams from a trainer state (``rng_ranks``: one state per rank, in order).

    Exact when the checkpoint has as many ranks as this run; otherwise every rank is reseeded from
    ``rank_seed(seed + step, rank)``, so the run goes on with fresh, distinct streams (dropout, masks and
    negatives then differ from an uninterrupted run; the weights and data position do not).
    """
    from vlp.train.seeding import seed_everything, set_rng_state

    saved = trainer.get("rng_ranks") or [trainer["rng"]]
    if len(saved) == world_size:
        set_rng_state(saved[rank])
        return
    seed_everything(rank_seed(seed + int(trainer["step"]), rank))
    if rank == 0:
        log.warning("checkpoint written by %d rank(s), resumed on %d: RNG streams reseeded", len(saved), world_size)


def resume_position(trainer: dict[str, Any], world_size: int, batch_size: int) -> int:
    """Batches per rank into the epoch where a resumed run goes on.

    A checkpoint records its world size and per-rank batch size; when this run has others, the samples that
    the epoch had consumed are divided anew. ``ResumableSampler`` deals the epoch's permutation out rank by
    rank, so after n batches of B on W ranks exactly its first n*B*W indices are used: the position stays
    exact when that count divides by the new batch x world (else it rounds down and some samples repeat).
    """
    batches = int(trainer["batches_in_epoch"])
    saved_world, saved_batch = int(trainer.get("world_size", world_size)), int(trainer.get("batch_size", batch_size))
    if (saved_world, saved_batch) == (world_size, batch_size):
        return batches
    consumed, per_batch = batches * saved_batch * saved_world, batch_size * world_size
    if consumed % per_batch:
        log.warning("resume: %d samples of the epoch consumed, not a multiple of %d x %d: %d are repeated",
                    consumed, batch_size, world_size, consumed % per_batch)
    return consumed // per_batch


def equal_rows(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` cut to the smallest batch of all ranks (a collective; unchanged without a group).

    Unreadable samples are dropped per rank, so batch sizes can differ, while every cross-rank gather needs
    the same shape everywhere (and a rank with an empty batch must skip the step with all the others).
    Cuts tensors whose first dimension is the batch, and the ``captions`` list.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return batch
    images = batch["images"]
    rows = torch.tensor([images.shape[0]], device=images.device)
    dist.all_reduce(rows, op=dist.ReduceOp.MIN)
    keep, size = int(rows), images.shape[0]
    if keep == size:
        return batch
    return {key: value[:keep] if (isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size)
            or key == "captions" else value for key, value in batch.items()}


# ---------------------------------------------------------------------------------------- FSDP2 helpers
def fsdp_modules(root: nn.Module) -> list[nn.Module]:
    """The modules of ``root`` that ``fully_shard`` made FSDP modules (empty without FSDP)."""
    from torch.distributed.fsdp import FSDPModule

    return [module for module in root.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def full_state_dicts(root: nn.Module) -> Iterator[None]:
    """Inside the block, ``state_dict()`` of ``root`` or any sub-module holds full, unsharded CPU tensors on
    rank 0, so the checkpoint writers (``save_pretrained``, safetensors) work unchanged under FSDP.

    A collective under FSDP (every rank enters; rank 0 then writes); no-op without FSDP.
    """
    if not fsdp_modules(root):
        yield
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # own storage for each: the gathered tensors can be views of one buffer, which safetensors refuses;
    # tied parameters (the MLM decoder and the word embeddings) share one copy again, as in the model
    full = {key: value.clone() if isinstance(value, Tensor) else value for key, value in full.items()}
    first_name: dict[int, str] = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        first = first_name.setdefault(id(param), name)
        if first != name and first in full and name in full:
            full[name] = full[first]
    handles = []
    for name, module in root.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
        if not own:
            continue

        def replace(_module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any,
                    own: list[str] = own, path: str = f"{name}." if name else "") -> None:
            for attr in own:
                if prefix + attr in state and path + attr in full:
                    state[prefix + attr] = full[path + attr]

        handles.append(module.register_state_dict_post_hook(replace))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict: under FSDP the full (unsharded, CPU) state keyed by parameter name, which
    loads on any world size (a collective: every rank calls it); otherwise ``optimizer.state_dict()``."""
    if not fsdp_modules(root):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state: dict[str, Any] = get_optimizer_state_dict(
        root, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state


def load_optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> bool:
    """Load ``optimizer_state``'s output; False (nothing loaded) when it was saved with the other setting of
    ``train.fsdp`` (names vs. indices as keys), so the caller can warn and keep fresh moments."""
    by_name = any(isinstance(key, str) for key in state.get("state", {}))
    if bool(fsdp_modules(root)) != by_name:
        return False
    if not by_name:
        optimizer.load_state_dict(state)
        return True
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(root, optimizer, state, options=StateDictOptions(full_state_dict=True))
    return True


def parallelize(objective: nn.Module, info: DistInfo, fsdp: bool = False, compile: bool = False,
                seed: int | None = None) -> nn.Module:
    """What ``train.compile`` and ``train.fsdp`` ask of the module that owns the training step: compile its
    blocks, wrap it (DDP, or FSDP2 in place) when there are several ranks, then give every rank its own RNG
    streams (``rank_seed(seed, rank)``), now that the identically built model exists everywhere. Returns the
    module to call for the step: the DDP wrapper, or ``objective`` itself."""
    if compile:
        compile_blocks(objective)
    engine = wrap_model(objective, info, fsdp=fsdp)
    if info.distributed and seed is not None:
        from vlp.train.seeding import seed_everything

        seed_everything(rank_seed(seed, info.rank))
    return engine


def compile_blocks(root: nn.Module, block_types: tuple[type[nn.Module], ...] | None = None) -> int:
    """``torch.compile`` every transformer block of ``root`` in place (``Module.compile``: parameter names and
    checkpoints are unchanged). Blocks rather than the whole objective: the step's gathers, sampling and
    data-dependent shapes would break one big graph apart, while the blocks hold nearly all the FLOPs and
    share one compiled graph per block type. Returns the number of compiled blocks."""
    types = block_types if block_types is not None else default_block_types()
    blocks = [module for module in root.modules() if isinstance(module, types)]
    for block in blocks:
        block.compile()
    return len(blocks)
