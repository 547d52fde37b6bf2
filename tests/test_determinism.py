"""Seeded runs repeat exactly on several CPU threads: the gradient of repeated rows (hard negatives drawn
twice) is added in one order, not in whatever order threads finish."""

from __future__ import annotations

import torch

from vlp.types import EncoderOutput


def test_selecting_repeated_rows_has_the_same_gradient_on_every_run() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randn(128, 40, 128, generator=generator, requires_grad=True)
        pooled = torch.randn(128, 64, generator=generator, requires_grad=True)
        out = EncoderOutput(tokens, torch.ones(128, 40, dtype=torch.bool), pooled)
        rows = torch.randint(0, 16, (192,), generator=generator)  # every row drawn about 12 times
        upstream = torch.randn(192, 40, 128, generator=generator)

        def gradient() -> torch.Tensor:
            tokens.grad = None
            out.select(rows).tokens.backward(upstream)
            assert tokens.grad is not None
            return tokens.grad.clone()

        first = gradient()
        assert all(torch.equal(first, gradient()) for _ in range(10))
        expected = torch.zeros_like(tokens).index_put_((rows,), upstream, accumulate=True)
        assert torch.allclose(first, expected, atol=1e-5)
        picked = out.select(rows)
        assert torch.equal(picked.tokens, tokens[rows]) and torch.equal(picked.pooled, pooled[rows])
        assert torch.equal(out.select(slice(2, 5)).tokens, tokens[2:5])
    finally:
        torch.set_num_threads(threads)
