"""Transformer blocks composed from attention and MLP pieces: pre-norm (ViT/CLIP) and post-norm (BERT)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlp.layers.attention import Attention
from vlp.layers.mlp import MLP
from vlp.layers.options import Rows, SharedContext

__all__ = ["TransformerBlock", "init_transformer_weights", "init_cross_modal_weights", "FUSION_INITS"]


def init_transformer_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT/ViT initialization: truncated normal (std 0.02) Linear and Embedding weights, zero biases,
    LayerNorm weight 1 and bias 0. Use as ``model.apply(init_transformer_weights)``."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.trunc_normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


FUSION_INITS = ("xavier", "bert")


def init_cross_modal_weights(module: nn.Module, scheme: str = "xavier") -> None:
    """Initialize a fusion block built from scratch: ``xavier`` (default) = Xavier-uniform Linear weights
    (as MAE and timm's jax-style ViT init), ``bert`` = BERT's truncated normal std 0.02
    (``init_transformer_weights``); both with zero biases and unit LayerNorms (embeddings: std 0.02).

    Why not BERT's rule by default: std 0.02 keeps a linear layer's gain near 0.55 only at BERT-base's width
    768 (0.02 x sqrt(768)); at smaller widths each projection shrinks its input further, and a random
    cross-attention then adds well under 1% image-dependent signal to the [CLS] state the match head
    reads (0.6% of its norm moves when the demo model's image is swapped at init; 9% with Xavier gains).
    Matching needs an image x text interaction, whose gradient is the product of the two pathways' scales.
    ALBEF/BLIP fusions start from pretrained BERT layers, where this choice only touches the
    cross-attention; converted checkpoints overwrite it."""
    if scheme not in FUSION_INITS:
        raise ValueError(f"unknown fusion init {scheme!r}; expected one of {', '.join(FUSION_INITS)}")
    module.apply(init_transformer_weights)
    if scheme == "xavier":
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                nn.init.xavier_uniform_(sub.weight)


def _all_rows(x: Tensor) -> Tensor:
    return x


def _picker(positions: Tensor) -> Callable[[Tensor], Tensor]:
    """x [b, n, d] -> [b, 1, d], row ``positions[b]`` of each sequence (a slice when it is the first row)."""
    if positions.device.type == "cpu" and not bool(positions.any()):
        return lambda x: x[:, :1]
    batch = torch.arange(positions.shape[0], device=positions.device)
    return lambda x: x[batch, positions].unsqueeze(1)


class TransformerBlock(nn.Module):
    """Self-attention (+ optional cross-attention) + MLP with residuals.

    ``pre_norm=True``: x + f(norm(x)) as in ViT/CLIP; ``pre_norm=False``: norm(x + f(x)) as in BERT.
    ``grad_checkpointing = True`` recomputes the block's activations in backward (only while training
    with gradients enabled).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 pre_norm: bool = True, cross_attention: bool = False, context_dim: int | None = None,
                 eps: float = 1e-6, activation: str = "gelu") -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.grad_checkpointing = False
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, dropout=dropout)
        self.cross_attn = Attention(dim, num_heads, context_dim=context_dim, dropout=dropout) if cross_attention else None
        self.norm_cross = nn.LayerNorm(dim, eps=eps) if cross_attention else None
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout=dropout, activation=activation)
        self.drop = nn.Dropout(dropout)

    def _residual(self, x: Tensor, norm: nn.Module, fn: Callable[[Tensor], Tensor],
                  rows: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """The residual branch; only ``rows(x)`` get an output (``fn`` still sees all of ``x``)."""
        kept = x if rows is None else rows(x)
        if self.pre_norm:
            return kept + fn(norm(x))
        return norm(kept + fn(x))

    def forward(self, x: Tensor, mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, causal: bool = False, rows: Rows | None = None,
                shared: SharedContext | None = None) -> Tensor:
        """x [b, n, dim]; mask bool [b, n]; context [b, m, context_dim] with context_mask bool [b, m].

        Speed-only options (``vlp.layers.options``): ``rows`` = compute only those rows [b, 1, dim] (each still
        attends to every token); ``shared`` = the cross-attention's context prepared earlier (cached
        ``cross_attn.key_value(context)`` used instead of ``context``, and/or an index naming the shared context
        each row reads; ``context_mask`` is then [g, m]).
        """
        return self.forward_with_weights(x, mask, context, context_mask, causal, rows=rows, shared=shared)[0]

    def forward_with_weights(
        self, x: Tensor, mask: Tensor | None = None, context: Tensor | None = None,
        context_mask: Tensor | None = None, causal: bool = False, return_weights: bool = False,
        rows: Rows | None = None, shared: SharedContext | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """As ``forward``; with ``return_weights`` also the attention weights [b, h, n, m] under
        ``"self"`` and ``"cross"`` (explicit attention path instead of SDPA)."""
        if rows is not None and rows.is_first and causal:
            raise ValueError("Rows.first() needs non-causal attention (the first token would see only itself)")
        positions = None if rows is None else rows.positions(x)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            out: tuple[Tensor, dict[str, Tensor]] = checkpoint(
                self._forward, x, mask, context, context_mask, causal, return_weights, positions, shared,
                use_reentrant=False,
            )
            return out
        return self._forward(x, mask, context, context_mask, causal, return_weights, positions, shared)

    def _forward(
        self, x: Tensor, mask: Tensor | None, context: Tensor | None, context_mask: Tensor | None,
        causal: bool, return_weights: bool, positions: Tensor | None, shared: SharedContext | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``positions`` [b]: the one row of each sequence to compute (``Rows.positions``); None = all."""
        weights: dict[str, Tensor] = {}
        rows: Callable[[Tensor], Tensor] = _all_rows
        self_mask = mask
        if positions is not None:
            rows = _picker(positions)
            if causal:  # one query at position p under a causal mask: the keys up to p
                steps = torch.arange(x.shape[1], device=x.device)
                self_mask = steps[None, :] <= positions[:, None]
                self_mask = self_mask if mask is None else self_mask & mask.bool()
                causal = False

        def self_attend(h: Tensor) -> Tensor:
            # a row subset: those query rows attend to the same keys/values as in the full layer
            out, w = self.attn(rows(h), context=None if positions is None else h, key_mask=self_mask, causal=causal,
                               return_weights=return_weights)
            if w is not None:
                weights["self"] = w
            return self.drop(out)

        x = self._residual(x, self.norm1, self_attend, rows)
        cross, norm_cross = self.cross_attn, self.norm_cross
        has_context = context is not None or (shared is not None and shared.kv is not None)
        if cross is not None and norm_cross is not None and has_context:

            def cross_attend(h: Tensor) -> Tensor:
                out, w = cross(h, context=context, key_mask=context_mask, return_weights=return_weights,
                               shared=shared)
                if w is not None:
                    weights["cross"] = w
                return self.drop(out)

            x = self._residual(x, norm_cross, cross_attend)
        # MLP applies its own output dropout, so the branch is not dropped a second time here.
        return self._residual(x, self.norm2, self.mlp), weights
