"""open_clip towers computing only their pooled row (the speed-only ``pooled_only`` of their encoders).

open_clip has no such path, so ``run_to_rows`` repeats ``ResidualAttentionBlock.forward`` for the rows a
pooled embedding reads, and the towers are entered through their private ``VisionTransformer._embeds``.
Only the forms reproduced exactly take it (``image_row_supported`` / ``text_row_supported``); the
encoders run every other tower in full. The result equals the full pass's pooled row (tests compare them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["image_row_supported", "image_pooled_row", "text_row_supported", "text_pooled_row"]


def image_row_supported(visual: Any) -> bool:
    """A ViT tower pooling its class token (no attention pooling, no LayerNorm after pooling) of plain blocks."""
    from open_clip.transformer import VisionTransformer

    return (isinstance(visual, VisionTransformer) and visual.attn_pool is None and not visual.final_ln_after_pool
            and visual.pool_type == "tok" and plain_blocks(visual.transformer))


def image_pooled_row(visual: Any, images: Tensor) -> Tensor:
    """The class-token row after ``ln_post`` [b, 1, width], its last block computing that row alone."""
    x = visual._embeds(images)
    first = x.new_zeros(x.shape[0], dtype=torch.long)
    return visual.ln_post(run_to_rows(visual.transformer, x, first, causal=False))  # type: ignore[no-any-return]


def text_row_supported(text: Any) -> bool:
    """A causal text tower pooling at one token (argmax/eos/first) of plain blocks."""
    return (text.attn_mask is not None and text.pool_type in ("argmax", "eos", "first")
            and plain_blocks(text.transformer))


def text_pooled_row(text: Any, ids: Tensor) -> Tensor:
    """The pooled token's row after ``ln_final`` [b, 1, width]: no columns after the last pooled position
    (causal: later positions cannot reach it), and only that row in the last block."""
    if text.pool_type == "argmax":  # CLIP's BPE: EOT is the largest id
        rows = ids.argmax(dim=-1)
    elif text.pool_type == "eos":
        rows = (ids == text.eos_id).int().argmax(dim=-1)
    else:
        rows = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    steps = int(rows.max()) + 1
    ids = ids[:, :steps]
    cast_dtype = text.transformer.get_cast_dtype()
    x = text.token_embedding(ids).to(cast_dtype) + text.positional_embedding[:steps].to(cast_dtype)
    return text.ln_final(run_to_rows(text.transformer, x, rows, causal=True))  # type: ignore[no-any-return]


def plain_blocks(transformer: Any) -> bool:
    """Whether an open_clip Transformer is batch-first plain ResidualAttentionBlocks (self-attention only),
    the form ``run_to_rows`` reproduces."""
    from open_clip.transformer import ResidualAttentionBlock

    blocks = list(transformer.resblocks)
    return bool(blocks) and bool(getattr(transformer, "batch_first", False)) and all(
        type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv") for block in blocks)


def run_to_rows(transformer: Any, x: Tensor, rows: Tensor, causal: bool) -> Tensor:
    """open_clip's Transformer over x [b, n, d] whose last block computes only row ``rows[b]`` of each
    sequence -> [b, 1, d] (its attention still reads every key; ``causal``: the keys up to that row).
    The same operations as ResidualAttentionBlock.forward, for the rows a pooled embedding reads."""
    from torch.utils.checkpoint import checkpoint

    blocks = list(transformer.resblocks)
    steps = x.shape[1]
    full_mask = None
    if causal:  # open_clip's additive causal mask, built as in TextTransformer.build_causal_mask
        full_mask = torch.full((steps, steps), float("-inf"), device=x.device).triu(1)
    for block in blocks[:-1]:
        if transformer.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, None, None, full_mask, use_reentrant=False)
        else:
            x = block(x, attn_mask=full_mask)
    last = blocks[-1]
    row_mask = None
    if causal:  # [b * heads, 1, n]: each query row sees the keys up to its position
        hidden = torch.arange(steps, device=x.device)[None, :] > rows[:, None]
        row_mask = torch.zeros(hidden.shape, device=x.device).masked_fill(hidden, float("-inf"))
        row_mask = row_mask.repeat_interleave(last.attn.num_heads, dim=0)[:, None, :]

    def last_block(x: Tensor) -> Tensor:
        batch = torch.arange(x.shape[0], device=x.device)
        normed = last.ln_1(x)
        query = normed[batch, rows].unsqueeze(1)
        out = x[batch, rows].unsqueeze(1) + last.ls_1(last.attention(q_x=query, k_x=normed, v_x=normed,
                                                                     attn_mask=row_mask))
        return out + last.ls_2(last.mlp(last.ln_2(out)))  # type: ignore[no-any-return]

    if transformer.grad_checkpointing and torch.is_grad_enabled():
        return checkpoint(last_block, x, use_reentrant=False)  # type: ignore[no-any-return]
    return last_block(x)
