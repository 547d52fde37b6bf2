"""Pieces of the gradient-cache step (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size
under Memory Limited Setup") that ``PretrainObjective.training_step_chunked`` composes.

The contrastive loss couples every sample of the batch, but its gradient only reaches the encoders
through the embeddings. So the step (1) embeds the batch chunk by chunk without keeping activations,
(2) computes the loss on the whole batch with the embeddings as leaf tensors and backpropagates it to
them (and to the temperature/bias), then (3) re-encodes each chunk with activations and backpropagates
the cached embedding gradients. Dropout must draw the same masks in (1) and (3): ``RngSnapshot`` saves
the generator states before a chunk's first encoding and replays them for the second.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from vlp.collectives import gather_no_grad, gather_with_grad, rank_and_world
from vlp.types import EncoderOutput

__all__ = ["RngSnapshot", "chunk_slices", "gather_tokens", "take_rows"]


class RngSnapshot:
    """The CPU generator state (and the CUDA one of ``device``) at construction; ``restored()`` runs a block
    from that state inside ``torch.random.fork_rng``, so the draws repeat and the outer stream is untouched."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def chunk_slices(total: int, size: int) -> list[slice]:
    """Consecutive row ranges of at most ``size`` rows covering ``range(total)``."""
    if size <= 0:
        raise ValueError(f"chunk size must be positive, got {size}")
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def gather_tokens(out: EncoderOutput, with_grad: bool = True) -> EncoderOutput:
    """Every rank's token states and masks (rank 0's rows first), padded to the longest sequence.

    Identity outside a process group. ``with_grad=False`` gathers detached copies (the cached pass-1
    states of the gradient-cache step)."""
    _, world = rank_and_world()
    if world == 1:
        return out if with_grad else EncoderOutput(out.tokens.detach(), out.mask, out.pooled.detach())
    gather = gather_with_grad if with_grad else gather_no_grad
    length = torch.tensor([out.tokens.shape[1]], device=out.tokens.device)
    padded = out.padded(int(gather_no_grad(length).max()))
    return EncoderOutput(gather(padded.tokens), gather_no_grad(padded.mask), gather(out.pooled))


def take_rows(live: EncoderOutput, cached: EncoderOutput, index: Tensor, start: int) -> EncoderOutput:
    """Rows ``index`` of the gathered batch: from ``live`` (this chunk, re-encoded with gradient) where the
    row belongs to the chunk (``start <= index < start + len(live)``), else from ``cached`` (the detached
    pass-1 states of the whole gathered batch, whose sequence length is at least the chunk's).

    An ITM negative drawn from another chunk therefore carries no gradient; one from the same chunk does,
    so with a single chunk this equals the unchunked objective."""
    rows, length = live.tokens.shape[0], cached.tokens.shape[1]
    local = index - start
    inside = (local >= 0) & (local < rows)
    pick = local.clamp(0, rows - 1)
    mine = live.padded(length).select(pick)
    tokens = torch.where(inside[:, None, None], mine.tokens, cached.tokens[index].to(mine.tokens.dtype))
    mask = torch.where(inside[:, None], mine.mask, cached.mask[index])
    pooled = torch.where(inside[:, None], mine.pooled, cached.pooled[index].to(mine.pooled.dtype))
    return EncoderOutput(tokens, mask, pooled)
