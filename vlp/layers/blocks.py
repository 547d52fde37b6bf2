"""Transformer blocks composed from attention and MLP pieces: pre-norm (ViT/CLIP) and post-norm (BERT)."""

from __future__ import annotations

from torch import Tensor, nn

from vlp.layers.attention import Attention
from vlp.layers.mlp import MLP

__all__ = ["TransformerBlock"]


class TransformerBlock(nn.Module):
    """Self-attention (+ optional cross-attention) + MLP with residuals.

    ``pre_norm=True``: x + f(norm(x)) as in ViT/CLIP; ``pre_norm=False``: norm(x + f(x)) as in BERT.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 pre_norm: bool = True, cross_attention: bool = False, context_dim: int | None = None,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, dropout=dropout)
        self.cross_attn = Attention(dim, num_heads, context_dim=context_dim, dropout=dropout) if cross_attention else None
        self.norm_cross = nn.LayerNorm(dim, eps=eps) if cross_attention else None
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout=dropout)
        self.drop = nn.Dropout(dropout)

    def _residual(self, x: Tensor, norm: nn.Module, fn: object) -> Tensor:
        if self.pre_norm:
            return x + self.drop(fn(norm(x)))  # type: ignore[operator]
        return norm(x + self.drop(fn(x)))  # type: ignore[operator]

    def forward(self, x: Tensor, mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, causal: bool = False) -> Tensor:
        x = self._residual(x, self.norm1, lambda h: self.attn(h, key_mask=mask, causal=causal)[0])
        if self.cross_attn is not None and context is not None:
            cross = self.cross_attn
            x = self._residual(x, self.norm_cross, lambda h: cross(h, context=context, key_mask=context_mask)[0])
        return self._residual(x, self.norm2, self.mlp)
