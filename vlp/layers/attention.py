"""Multi-head attention on ``F.scaled_dot_product_attention`` with an explicit path that returns weights.

Axis legend: b = batch, n = query tokens, m = key tokens, h = heads, d = head width.
Masks are bool, True = real token, and are converted once here at the attention call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vlp.layers.options import SharedContext

__all__ = ["Attention", "attention", "attention_by_context", "key_padding_bias"]


def key_padding_bias(key_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool key mask [b, m] (True = real) as an additive bias [b, 1, 1, m] for SDPA/explicit paths."""
    if key_mask is None:
        return None
    bias = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
    bias = bias.masked_fill(~key_mask.bool(), torch.finfo(dtype).min)
    return rearrange(bias, "b m -> b 1 1 m")


def explicit_attention_is_faster(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether matmul + softmax beats SDPA for these [b, h, n, d] queries and [b, h, m, d] keys/values.

    Measured on CPU (torch 2.14, AVX-512 Xeon; benchmarks/bench_fusion.py and the per-shape timings in
    benchmarks/README.md): when gradients are needed, SDPA's bf16/fp16 flash kernel is 1.5-5x slower than
    the explicit path (mostly its backward), which makes a whole fusion layer 7-35% faster; in fp32 and
    without gradients (inference, re-ranking) SDPA is as fast or faster. CUDA keeps SDPA.
    """
    if q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def attention(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, causal: bool = False,
    dropout: float = 0.0, return_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention over [b, h, n, d]; returns (output, weights or None).

    SDPA by default; the explicit path when weights are asked for or when it is faster for the dtype/shape.
    """
    if not return_weights and not explicit_attention_is_faster(q, k, v):
        mask = None if key_mask is None else rearrange(key_mask.bool(), "b m -> b 1 1 m")
        if causal and mask is not None:
            n, m = q.shape[-2], k.shape[-2]
            mask = mask & torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
            causal = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        return out, None
    # Scaling q (n x d) instead of the scores (n x m) saves a pass over the larger tensor.
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    hidden: Tensor | None = None
    if key_mask is not None:
        hidden = ~rearrange(key_mask.bool(), "b m -> b 1 1 m")
    if causal:
        n, m = scores.shape[-2:]
        future = torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1)
        hidden = future if hidden is None else hidden | future
    if hidden is not None:
        # The matmul output is not saved for backward, so it can be masked in place.
        scores = scores.masked_fill_(hidden, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)
    dropped = F.dropout(weights, p=dropout) if dropout > 0 else weights
    return torch.matmul(dropped, v), weights if return_weights else None


def attention_by_context(q: Tensor, keys: Tensor, values: Tensor, index: Tensor,
                         key_mask: Tensor | None = None, dropout: float = 0.0) -> Tensor:
    """Attention of query rows that read shared contexts: row b of q [b, h, n, d] attends to the keys and
    values ``keys[index[b]]``, ``values[index[b]]`` of [g, h, m, d] (g distinct contexts, e.g. gallery
    images); ``key_mask`` [g, m] (True = real) per context.

    The rows that read one context are stacked along the query axis and attend in one call, so no
    per-row copy of the (much larger) keys and values is made. Equal to ``attention(q, keys[index],
    values[index], key_mask[index])``; differentiable in q, keys and values.
    """
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=keys.shape[0]).tolist()
    # one view per context from unbind, not a slice each: a slice's backward writes its gradient into a
    # zero tensor of the whole [g, h, m, d], g times per call (quadratic in g), where unbind's stacks them once
    key_rows, value_rows = keys.unbind(0), values.unbind(0)
    parts: list[Tensor] = []
    start = 0
    for context, count in enumerate(counts):
        if count == 0:
            continue
        stacked = rearrange(q[order[start:start + count]], "c h n d -> 1 h (c n) d")
        start += count
        mask = None if key_mask is None else key_mask[context:context + 1]
        result, _ = attention(stacked, key_rows[context][None], value_rows[context][None], mask, dropout=dropout)
        parts.append(rearrange(result, "1 h (c n) d -> c h n d", c=count))
    return torch.cat(parts)[torch.argsort(order)]  # back to the rows' own order


def _joint_linear(x: Tensor, layers: tuple[nn.Linear, ...]) -> Tensor:
    """Several projections of one input as one GEMM over their concatenated weights.

    The parameters stay separate (checkpoint layout unchanged); one wide GEMM is faster on CPU, and under
    autocast the input is cast once and backward computes one input gradient instead of summing several.
    """
    if any(type(layer) is not nn.Linear for layer in layers):  # e.g. LoRA-wrapped: their forward must run
        return torch.cat([layer(x) for layer in layers], dim=-1)
    weight = torch.cat([layer.weight for layer in layers])
    biases = [layer.bias for layer in layers]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([layer.weight.new_zeros(layer.out_features) if b is None else b
                          for layer, b in zip(layers, biases)])
    return F.linear(x, weight, bias)


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
        keys, values = rearrange(_joint_linear(context, (self.k, self.v)), "b m (two h d) -> two b h m d",
                                 two=2, h=self.num_heads)
        return keys, values

    def forward(
        self, x: Tensor, context: Tensor | None = None, key_mask: Tensor | None = None, causal: bool = False,
        return_weights: bool = False, shared: SharedContext | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """x [b, n, dim] attends to ``context`` [b, m, context_dim] (None = to itself). ``shared``: a context
        prepared earlier, its cached keys/values used instead of ``context``; with ``shared.index`` row b
        reads context ``shared.index[b]`` (``key_mask`` [g, m] is then per context), see ``SharedContext``."""
        if shared is not None and shared.index is not None:
            out = self._attend_by_context(x, context, key_mask, causal, return_weights, shared.index, shared.kv)
            return out, None
        kv = None if shared is None else shared.kv
        dropout = self.dropout if self.training else 0.0
        if context is None and kv is None and self.k.in_features == self.q.in_features:
            q, k, v = rearrange(_joint_linear(x, (self.q, self.k, self.v)), "b n (three h d) -> three b h n d",
                                three=3, h=self.num_heads)
        else:
            q = self.split_heads(self.q(x))
            k, v = kv if kv is not None else self.key_value(x if context is None else context)
        out, weights = attention(q, k, v, key_mask, causal=causal, dropout=dropout, return_weights=return_weights)
        return self.proj(rearrange(out, "b h n d -> b n (h d)")), weights

    def _attend_by_context(self, x: Tensor, context: Tensor | None, key_mask: Tensor | None, causal: bool,
                           return_weights: bool, index: Tensor, kv: tuple[Tensor, Tensor] | None) -> Tensor:
        """Rows reading g shared contexts by ``index`` (``attention_by_context``): their keys/values are
        projected once (or are the cached ``kv``), never per row."""
        if return_weights or causal:
            raise ValueError("indexed (shared) contexts support neither attention weights nor causal masks")
        if context is None and kv is None:
            raise ValueError("a SharedContext index needs a context or its cached keys/values")
        q = self.split_heads(self.q(x))
        keys, values = kv if kv is not None else self.key_value(context)  # type: ignore[arg-type]
        dropout = self.dropout if self.training else 0.0
        out = attention_by_context(q, keys, values, index, key_mask, dropout=dropout)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # type: ignore[no-any-return]
