"""Exact chunked top-k (vlp.eval.topk): equal to a full-matrix top-k for every block shape, through the
grouped first-block screen, the threshold path of later blocks and its fallback, with ties."""

from __future__ import annotations

import pytest
import torch

from vlp.eval.topk import chunked_topk


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 53, 1000])
def test_chunked_topk_equals_full_topk(chunk_size: int) -> None:
    generator = torch.Generator().manual_seed(1)
    queries, gallery = torch.randn(37, 6, generator=generator), torch.randn(53, 6, generator=generator)
    expected_values, expected_indices = (queries @ gallery.T).topk(7, dim=1)
    values, indices = chunked_topk(queries, gallery, 7, chunk_size=chunk_size)
    torch.testing.assert_close(values, expected_values)
    assert torch.equal(indices, expected_indices)
    values, indices = chunked_topk(queries, gallery, 7, memory_mb=0.0005)  # ~131 scores per block
    assert torch.equal(indices, expected_indices)


@pytest.mark.parametrize("quantize", [False, True])
def test_chunked_topk_large_gallery_threshold_path_and_ties(quantize: bool) -> None:
    """Blocks after the first merge only the scores above each row's running k-th best (grouped screening);
    with ties (quantized embeddings) and with a block where every score ties (the packed candidates would
    be too many: grouped fallback), the values equal a full top-k and every index carries its value."""
    generator = torch.Generator().manual_seed(5)
    queries, gallery = torch.randn(64, 8, generator=generator), torch.randn(6000, 8, generator=generator)
    if quantize:
        queries, gallery = queries.round(), gallery.round()
    gallery[2000:2500] = gallery[7]  # 500 identical items: one block of equal scores per query
    scores = queries @ gallery.T
    expected_values, expected_indices = scores.topk(20, dim=1)
    values, indices = chunked_topk(queries, gallery, 20, memory_mb=0.02)  # blocks of ~80 x 64 scores
    torch.testing.assert_close(values, expected_values, atol=0, rtol=0)
    torch.testing.assert_close(scores.gather(1, indices), values, atol=0, rtol=0)
    assert all(len(set(row)) == 20 for row in indices.tolist())
    if not quantize:
        assert torch.equal(indices, expected_indices)
