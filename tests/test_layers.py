"""vlp.layers: attention paths against each other and torch's MultiheadAttention; blocks; MLP; init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from vlp.layers import (
    MLP,
    Attention,
    Rows,
    SharedContext,
    TransformerBlock,
    attention,
    init_transformer_weights,
    key_padding_bias,
)

B, H, N, M, D = 3, 4, 6, 9, 8


def _qkv(n: int = N, m: int = M, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, n, D, generator=gen), torch.randn(B, H, m, D, generator=gen),
            torch.randn(B, H, m, D, generator=gen))


def _key_mask(lengths: list[int], m: int) -> Tensor:
    return torch.arange(m)[None, :] < torch.tensor(lengths)[:, None]


def _naive_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, causal: bool) -> Tensor:
    """One (batch, head, query) at a time: softmax over the allowed keys only."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for n in range(q.shape[2]):
                allowed = [j for j in range(k.shape[2])
                           if (key_mask is None or bool(key_mask[b, j])) and (not causal or j <= n)]
                scores = torch.stack([q[b, h, n] @ k[b, h, j] / math.sqrt(q.shape[-1]) for j in allowed])
                weights = scores.softmax(0)
                out[b, h, n] = sum(w * v[b, h, j] for w, j in zip(weights, allowed))
    return out


def test_key_padding_bias_values() -> None:
    mask = torch.tensor([[True, False, True]])
    bias = key_padding_bias(mask, torch.float32)
    assert bias is not None and bias.shape == (1, 1, 1, 3)
    assert bias[0, 0, 0, 0] == 0 and bias[0, 0, 0, 2] == 0
    assert bias[0, 0, 0, 1] == torch.finfo(torch.float32).min
    assert key_padding_bias(None, torch.float32) is None


@pytest.mark.parametrize(("n", "m", "lengths", "causal"), [
    (N, N, [6, 3, 1], False),      # self-attention with padding
    (N, N, [6, 4, 2], True),       # causal + padding
    (N, N, None, True),            # causal only
    (N, M, [9, 5, 2], False),      # cross-attention, different key length
    (N, M, None, False),
])
def test_sdpa_equals_explicit_and_naive(n: int, m: int, lengths: list[int] | None, causal: bool) -> None:
    q, k, v = _qkv(n, m)
    key_mask = None if lengths is None else _key_mask(lengths, m)
    fast, none_weights = attention(q, k, v, key_mask, causal=causal)
    explicit, weights = attention(q, k, v, key_mask, causal=causal, return_weights=True)
    assert none_weights is None and weights is not None
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, _naive_attention(q, k, v, key_mask, causal), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, n))
    if key_mask is not None:  # padded keys get exactly zero weight
        assert weights.masked_select(~key_mask[:, None, None, :].expand_as(weights)).abs().max() == 0
    if causal:
        future = torch.ones(n, m, dtype=torch.bool).triu(1)
        assert weights[..., future].abs().max() == 0


def test_long_mask_equals_bool_mask() -> None:
    q, k, v = _qkv()
    mask = _key_mask([9, 4, 1], M)
    torch.testing.assert_close(attention(q, k, v, mask.long())[0], attention(q, k, v, mask)[0])
    torch.testing.assert_close(attention(q, k, v, mask.long(), return_weights=True)[0], attention(q, k, v, mask)[0],
                               atol=1e-5, rtol=1e-5)


def test_attention_module_matches_torch_multihead_attention() -> None:
    torch.manual_seed(0)
    dim, heads = 16, 4
    ours = Attention(dim, heads)
    reference = nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([ours.q.weight, ours.k.weight, ours.v.weight]))
        reference.in_proj_bias.copy_(torch.cat([ours.q.bias, ours.k.bias, ours.v.bias]))
        reference.out_proj.weight.copy_(ours.proj.weight)
        reference.out_proj.bias.copy_(ours.proj.bias)
    x, context = torch.randn(B, N, dim), torch.randn(B, M, dim)
    mask = _key_mask([9, 3, 5], M)
    expected, expected_weights = reference(x, context, context, key_padding_mask=~mask, average_attn_weights=False)
    for return_weights in (False, True):
        out, weights = ours(x, context=context, key_mask=mask, return_weights=return_weights)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        if return_weights:
            assert weights is not None
            torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)


def test_attention_cached_key_value_equals_context() -> None:
    torch.manual_seed(0)
    module = Attention(16, 4, context_dim=12)
    x, context = torch.randn(B, N, 16), torch.randn(B, M, 12)
    keys, values = module.key_value(context)
    assert keys.shape == (B, 4, M, 4)
    torch.testing.assert_close(module(x, shared=SharedContext(kv=(keys, values)))[0], module(x, context=context)[0])


def test_attention_rejects_indivisible_width() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        Attention(10, 4)


def _randomize(module: nn.Module, seed: int = 0) -> None:
    """Random values everywhere (LayerNorms included) so weight-copy comparisons are not trivially met."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
        for sub in module.modules():
            if isinstance(sub, nn.LayerNorm):
                sub.weight.add_(1.0)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_block_weights_path_and_cached_kv_equal_plain_forward(pre_norm: bool) -> None:
    torch.manual_seed(0)
    block = TransformerBlock(16, 4, pre_norm=pre_norm, cross_attention=True).eval()
    _randomize(block)
    x, context = torch.randn(B, N, 16), torch.randn(B, M, 16)
    mask, context_mask = _key_mask([6, 2, 4], N), _key_mask([9, 5, 1], M)
    plain = block(x, mask, context, context_mask)
    weighted, weights = block.forward_with_weights(x, mask, context, context_mask, return_weights=True)
    torch.testing.assert_close(weighted, plain, atol=1e-5, rtol=1e-5)
    assert set(weights) == {"self", "cross"}
    assert weights["self"].shape == (B, 4, N, N) and weights["cross"].shape == (B, 4, N, M)
    torch.testing.assert_close(weights["cross"].sum(-1), torch.ones(B, 4, N))
    assert block.cross_attn is not None
    cached = block(x, mask, context_mask=context_mask, shared=SharedContext(kv=block.cross_attn.key_value(context)))
    torch.testing.assert_close(cached, plain)


def test_block_pre_and_post_norm_match_their_formulas() -> None:
    torch.manual_seed(0)
    x, mask = torch.randn(B, N, 16), _key_mask([6, 3, 1], N)
    for pre_norm in (True, False):
        block = TransformerBlock(16, 4, pre_norm=pre_norm).eval()
        _randomize(block, seed=1)
        if pre_norm:
            h = x + block.attn(block.norm1(x), key_mask=mask)[0]
            expected = h + block.mlp(block.norm2(h))
        else:
            h = block.norm1(x + block.attn(x, key_mask=mask)[0])
            expected = block.norm2(h + block.mlp(h))
        torch.testing.assert_close(block(x, mask), expected)


def test_block_grad_checkpointing_same_gradients_and_recomputes() -> None:
    torch.manual_seed(0)
    block = TransformerBlock(16, 4, pre_norm=False, cross_attention=True).train()
    x, context = torch.randn(B, N, 16), torch.randn(B, M, 16)
    mask = _key_mask([6, 2, 4], N)
    calls: list[int] = []
    block.attn.register_forward_pre_hook(lambda *args: calls.append(1))

    def grads() -> dict[str, Tensor]:
        block.zero_grad()
        block(x, mask, context).square().sum().backward()
        return {name: p.grad.clone() for name, p in block.named_parameters() if p.grad is not None}

    plain = grads()
    assert len(calls) == 1
    block.grad_checkpointing = True
    checkpointed = grads()
    assert len(calls) == 3  # forward + recomputation in backward
    assert plain.keys() == checkpointed.keys() == {name for name, _ in block.named_parameters()}
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # no recomputation without gradients
        block(x, mask, context)
    assert len(calls) == 4


def test_mlp_activations() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    for name, reference in [("gelu", lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))),
                            ("gelu_tanh", lambda h: nn.functional.gelu(h, approximate="tanh")),
                            ("quick_gelu", lambda h: h * torch.sigmoid(1.702 * h))]:
        mlp = MLP(8, 16, activation=name)
        torch.testing.assert_close(mlp(x), mlp.fc2(reference(mlp.fc1(x))))
    with pytest.raises(ValueError, match="unknown MLP activation 'relu6'"):
        MLP(8, 16, activation="relu6")


def test_mlp_dropout_applied_once_per_branch_in_block() -> None:
    block = TransformerBlock(8, 2, dropout=0.5).train()
    block.attn.dropout = 0.0  # keep SDPA's own RNG use out of the comparison
    x = torch.randn(2, 3, 8)
    # Same RNG stream: one dropout on the attention branch, then the MLP's own two. A second dropout on
    # the MLP output would draw more random numbers and rescale the survivors again.
    torch.manual_seed(1)
    h = x + block.drop(block.attn(block.norm1(x))[0])
    expected = h + block.mlp(block.norm2(h))
    torch.manual_seed(1)
    torch.testing.assert_close(block(x), expected)


def test_init_transformer_weights() -> None:
    torch.manual_seed(0)
    linear, embedding, norm = nn.Linear(256, 512), nn.Embedding(300, 256), nn.LayerNorm(256)
    model = nn.Sequential(linear, embedding, norm)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(3.0)
    model.apply(init_transformer_weights)
    assert abs(linear.weight.std().item() - 0.02) < 0.001 and abs(linear.weight.mean().item()) < 0.001
    assert abs(embedding.weight.std().item() - 0.02) < 0.001
    assert linear.bias.abs().max() == 0
    assert torch.equal(norm.weight, torch.ones(256)) and norm.bias.abs().max() == 0


@pytest.mark.parametrize("pre_norm", [True, False])
def test_block_first_only_equals_first_row_of_full_forward(pre_norm: bool) -> None:
    block = TransformerBlock(16, 4, pre_norm=pre_norm, cross_attention=True).eval()
    _randomize(block)
    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(3, 6, 16, generator=gen), torch.randn(3, 5, 16, generator=gen)
    mask, context_mask = _key_mask([6, 3, 1], 6), _key_mask([5, 2, 4], 5)
    full = block(x, mask, context, context_mask)
    first = block(x, mask, context, context_mask, rows=Rows.first())
    assert first.shape == (3, 1, 16)
    torch.testing.assert_close(first[:, 0], full[:, 0], atol=1e-5, rtol=1e-5)
    # the first row still attends to the others: changing the later real tokens changes it
    x2 = x.clone()
    x2[0, 1:] = torch.randn(5, 16, generator=gen)
    assert (block(x2, mask, context, context_mask, rows=Rows.first()) - first).abs().max() > 1e-4
    with pytest.raises(ValueError, match="causal"):
        block(x, mask, causal=True, rows=Rows.first())


def test_attention_by_context_equals_per_row_copies_with_gradients() -> None:
    from vlp.layers import attention_by_context

    gen = torch.Generator().manual_seed(4)
    q = torch.randn(7, 2, 3, 8, generator=gen, requires_grad=True)
    keys = torch.randn(4, 2, 5, 8, generator=gen, requires_grad=True)
    values = torch.randn(4, 2, 5, 8, generator=gen, requires_grad=True)
    index = torch.tensor([2, 0, 2, 3, 0, 2, 3])  # context 1 unused, rows out of order
    key_mask = _key_mask([5, 3, 1, 4], 5)
    weights = torch.randn(7, 2, 3, 8, generator=gen)

    def run(shared: bool) -> tuple[Tensor, ...]:
        if shared:
            out = attention_by_context(q, keys, values, index, key_mask)
        else:
            out, _ = attention(q, keys[index], values[index], key_mask[index])
        grads = torch.autograd.grad((out * weights).sum(), (q, keys, values))
        return (out.detach(), *grads)

    for shared, reference in zip(run(True), run(False)):
        torch.testing.assert_close(shared, reference, atol=1e-6, rtol=1e-5)
    block = Attention(16, 2)
    with pytest.raises(ValueError, match="indexed"):
        block(torch.randn(7, 3, 16), shared=SharedContext(kv=(keys, values), index=index), return_weights=True)
    with pytest.raises(ValueError, match="needs a context"):
        block(torch.randn(7, 3, 16), shared=SharedContext(index=index))


def test_attention_by_context_backward_fills_each_context_once() -> None:
    """The backward writes each context's key/value gradient once: a per-context slice would zero-fill the
    whole [g, h, m, d] gradient g times (quadratic in the distinct images of an ITM step)."""
    from torch.profiler import ProfilerActivity, profile

    from vlp.layers import attention_by_context

    contexts = 40
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2 * contexts, 2, 3, 8, generator=gen, requires_grad=True)
    keys = torch.randn(contexts, 2, 5, 8, generator=gen, requires_grad=True)
    values = torch.randn(contexts, 2, 5, 8, generator=gen, requires_grad=True)
    index = torch.arange(2 * contexts) % contexts
    out = attention_by_context(q, keys, values, index)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out.sum().backward()
    full = [e for e in prof.events() if e.name in ("aten::fill_", "aten::zero_")
            and e.input_shapes and list(e.input_shapes[0]) == list(keys.shape)]
    assert len(full) <= 4, f"{len(full)} full-size gradient fills for {contexts} contexts"
    assert keys.grad is not None and bool((keys.grad != 0).any(dim=(1, 2, 3)).all())
