"""Multi-head attention on ``F.scaled_dot_product_attention`` with an explicit path that returns weights.

Axis legend: b = batch, n = query tokens, m = key tokens, h = heads, d = head width.
Masks are bool, True = real token, and are converted once here at the attention call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["Attention", "attention", "key_padding_bias"]


def key_padding_bias(key_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool key mask [b, m] (True = real) as an additive bias [b, 1, 1, m] for SDPA/explicit paths."""
    if key_mask is None:
        return None
    bias = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
    bias = bias.masked_fill(~key_mask.bool(), torch.finfo(dtype).min)
    return rearrange(bias, "b m -> b 1 1 m")


def attention(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, causal: bool = False,
    dropout: float = 0.0, return_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention over [b, h, n, d]; returns (output, weights or None)."""
    if not return_weights:
        mask = None if key_mask is None else rearrange(key_mask.bool(), "b m -> b 1 1 m")
        if causal and mask is not None:
            n, m = q.shape[-2], k.shape[-2]
            mask = mask & torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
            causal = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        return out, None
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * q.shape[-1] ** -0.5
    bias = key_padding_bias(key_mask, scores.dtype)
    if bias is not None:
        scores = scores + bias
    if causal:
        n, m = scores.shape[-2:]
        future = torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)
    dropped = F.dropout(weights, p=dropout) if dropout > 0 else weights
    return torch.einsum("bhnm,bhmd->bhnd", dropped, v), weights


class Attention(nn.Module):
    """Self- or cross-attention. ``context`` None = self-attention; ``context_dim`` sets the key/value input width."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, dropout: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        context_dim = context_dim or dim
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(context_dim, dim, bias=bias)
        self.v = nn.Linear(context_dim, dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def split_heads(self, x: Tensor) -> Tensor:
        return rearrange(x, "b n (h d) -> b h n d", h=self.num_heads)

    def key_value(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head keys and values of a context [b, m, c]; cacheable when the context is fixed."""
        return self.split_heads(self.k(context)), self.split_heads(self.v(context))

    def forward(
        self, x: Tensor, context: Tensor | None = None, key_mask: Tensor | None = None, causal: bool = False,
        return_weights: bool = False, kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        q = self.split_heads(self.q(x))
        k, v = kv if kv is not None else self.key_value(x if context is None else context)
        dropout = self.dropout if self.training else 0.0
        out, weights = attention(q, k, v, key_mask, causal=causal, dropout=dropout, return_weights=return_weights)
        return self.proj(rearrange(out, "b h n d -> b n (h d)")), weights
