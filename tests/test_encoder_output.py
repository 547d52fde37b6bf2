"""EncoderOutput.select / cat / padded: the row operations every chunked or gathered path shares."""

from __future__ import annotations

import torch

from vlp.types import EncoderOutput


def _output(rows: int, length: int, seed: int) -> EncoderOutput:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask[0, -1] = False
    return EncoderOutput(torch.randn(rows, length, 4, generator=generator), mask,
                         torch.randn(rows, 3, generator=generator))


def test_cat_pads_the_shorter_parts_with_masked_zeros_and_select_takes_them_back() -> None:
    short, long = _output(2, 3, 0), _output(3, 5, 1)
    both = EncoderOutput.cat([short, long])
    assert both.tokens.shape == (5, 5, 4) and both.mask.shape == (5, 5) and both.pooled.shape == (5, 3)
    assert not both.mask[:2, 3:].any() and (both.tokens[:2, 3:] == 0).all()
    back = both.select(slice(0, 2))
    torch.testing.assert_close(back.tokens[:, :3], short.tokens)
    torch.testing.assert_close(back.pooled, short.pooled)
    picked = both.select(torch.tensor([4, 2]))
    torch.testing.assert_close(picked.tokens, long.tokens[[2, 0]])
    assert torch.equal(picked.mask, long.mask[[2, 0]])


def test_cat_of_equal_lengths_is_a_plain_concatenation() -> None:
    a, b = _output(2, 4, 2), _output(1, 4, 3)
    both = EncoderOutput.cat([a, b])
    torch.testing.assert_close(both.tokens, torch.cat([a.tokens, b.tokens]))
    assert torch.equal(both.mask, torch.cat([a.mask, b.mask]))
