"""Masked language modeling: BERT-style token masking and the loss on the selected positions."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mask_tokens", "mlm_loss", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def _uniform(shape: torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.rand(shape, generator=generator, device=like.device)


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    mask_id: int,
    special_ids: Iterable[int],
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Select tokens for MLM and corrupt them as BERT does.

    input_ids: long [B, T]; attention_mask: [B, T] (bool or long, True/1 = real token).
    Each real, non-special token is selected with ``probability``; a selected token becomes
    ``mask_id`` with probability 0.8, a random non-special token with 0.1, and stays as is with 0.1.
    Returns (masked_ids [B, T], labels [B, T]): labels hold the original id at selected positions
    and -100 elsewhere. ``generator`` must live on ``input_ids``' device.
    """
    if not 0 < probability < 1:
        raise ValueError(f"MLM probability must lie in (0, 1), got {probability}")
    device = input_ids.device
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long, device=device)
    candidates = attention_mask.bool() & ~torch.isin(input_ids, special)
    selected = candidates & (_uniform(input_ids.shape, input_ids, generator) < probability)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    # One draw splits the selected tokens 80 / 10 / 10 into mask / random / keep.
    split = _uniform(input_ids.shape, input_ids, generator)
    to_mask = selected & (split < 0.8)
    to_random = selected & (split >= 0.8) & (split < 0.9)

    replacement_pool = torch.arange(vocab_size, device=device)
    replacement_pool = replacement_pool[~torch.isin(replacement_pool, special)]
    pick = torch.randint(len(replacement_pool), input_ids.shape, generator=generator, device=device)
    masked_ids = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked_ids = torch.where(to_random, replacement_pool[pick], masked_ids)
    return masked_ids, labels


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross entropy over the selected positions (labels != -100), in fp32.

    logits: [..., V] with labels [...] of the same leading shape, e.g. [B, T, V] and [B, T]. Only
    the selected rows are gathered before the softmax, so the cost scales with ~15% of the tokens.
    With no selected token the loss is 0, still connected to ``logits`` so every rank runs the same
    backward under DDP.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"mlm_loss: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    selected = labels != IGNORE_INDEX
    with torch.autocast(device_type=logits.device.type, enabled=False):
        if not bool(selected.any()):
            return logits.float().sum() * 0.0
        return F.cross_entropy(logits[selected].float(), labels[selected])
