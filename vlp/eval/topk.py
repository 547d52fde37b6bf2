"""Exact top-k of dot-product scores over a large gallery, in memory-bounded blocks.

``chunked_topk`` never holds the [queries, gallery] matrix: blocks of scores go into one reused buffer
and are merged into running top-k lists; after the first block only the scores that can still enter a
row's top-k are selected from (benchmarks/README.md: 1.5-1.9x the plain ``mm`` + ``topk`` merge).

Axis legend: q = queries, n = gallery columns of a block, g = screening groups.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["chunked_topk", "budget_elements"]

TOPK_GROUP = 16  # columns per group whose maximum screens a score block in chunked_topk


def budget_elements(memory_mb: float) -> int:
    return max(1, int(memory_mb * 2**20) // 4)  # fp32 scores


def chunked_topk(query_emb: Tensor, gallery_emb: Tensor, k: int, chunk_size: int | None = None,
                 memory_mb: float = 256) -> tuple[Tensor, Tensor]:
    """Top-k dot-product scores of every query over the gallery: (values [q, k], indices [q, k]).

    Scores are computed in (query chunk x gallery chunk) blocks, into one reused buffer, and merged into a
    running top-k, so the full [q, g] matrix never exists. ``chunk_size`` fixes both block sides; otherwise
    the block is sized to ``memory_mb`` of fp32 scores.
    """
    num_queries, num_gallery = query_emb.shape[0], gallery_emb.shape[0]
    if not 0 < k <= num_gallery:
        raise ValueError(f"k={k} must be in 1..{num_gallery} (the gallery size)")
    if chunk_size is not None:
        query_chunk = gallery_chunk = max(1, chunk_size)
    else:
        budget = budget_elements(memory_mb)
        gallery_chunk = min(num_gallery, max(k, budget // max(1, min(num_queries, 1024))))
        query_chunk = max(1, budget // gallery_chunk)
    values = torch.empty(num_queries, k, dtype=torch.float32, device=query_emb.device)
    indices = torch.empty(num_queries, k, dtype=torch.long, device=query_emb.device)
    # A fresh multi-MB block per step would be page-faulted in every time; one buffer is reused instead.
    buffer = torch.empty(min(query_chunk, num_queries) * min(gallery_chunk, num_gallery), dtype=torch.float32,
                         device=query_emb.device)
    for q_start in range(0, num_queries, query_chunk):
        queries = query_emb[q_start:q_start + query_chunk].float()
        best_values: Tensor | None = None
        best_indices: Tensor | None = None
        for g_start in range(0, num_gallery, gallery_chunk):
            gallery = gallery_emb[g_start:g_start + gallery_chunk].float()
            block = torch.mm(queries, gallery.T, out=buffer[:queries.shape[0] * gallery.shape[0]].view(
                queries.shape[0], gallery.shape[0]))  # [q, g]
            best_values, best_indices = _merge_topk(block, g_start, k, best_values, best_indices)
        assert best_values is not None and best_indices is not None
        values[q_start:q_start + query_chunk] = best_values
        indices[q_start:q_start + query_chunk] = best_indices
    return values, indices


def _column_groups(block: Tensor) -> tuple[Tensor, Tensor, int]:
    """Screening groups of a score block [q, n]: (scores [q, TOPK_GROUP, groups], their maxima [q, groups],
    the number of groups). Group g holds the columns g, g + groups, g + 2 groups, ...: strided groups make
    the maximum an elementwise max of contiguous slices (about 1.6x the speed of reducing contiguous runs);
    the last n mod TOPK_GROUP columns are in no group."""
    groups = block.shape[1] // TOPK_GROUP
    grouped = block[:, :groups * TOPK_GROUP].unflatten(1, (TOPK_GROUP, groups))
    return grouped, grouped.amax(dim=1), groups


def _merge_topk(block: Tensor, offset: int, k: int, best_values: Tensor | None,
                best_indices: Tensor | None) -> tuple[Tensor, Tensor]:
    """Merge a score block [q, n] (gallery columns from ``offset``) into running top-k lists sorted descending.

    Exact, with far less selection work than a top-k per block: one pass takes the maximum of each group of
    ``TOPK_GROUP`` columns (``_column_groups``), and a score can only enter a row's top-k if its group's
    maximum reaches the running k-th best, so only the few groups that do are selected from
    (``_merge_above_threshold``). Before a row holds k scores, the k best groups of the block hold its k
    best scores.
    """
    num_columns = block.shape[1]
    if num_columns // TOPK_GROUP <= k:
        values, columns = block.topk(min(k, num_columns), dim=1)
        return _keep_best(best_values, best_indices, values, columns + offset, k)
    grouped, maxima, groups = _column_groups(block)
    if best_values is not None and best_indices is not None and best_values.shape[1] >= k:
        merged = _merge_above_threshold(block, offset, k, best_values, best_indices, grouped, maxima)
        if merged is not None:
            return merged
    width = k
    if best_values is not None and best_values.shape[1] >= k:
        width = int((maxima >= best_values[:, -1:]).sum(dim=1).max())
    if width > 0:
        # Rows with fewer live groups also bring a few dead ones: a superset of the candidates is still exact.
        ids = maxima.topk(width, dim=1).indices  # [q, width]
        values = grouped.gather(2, ids[:, None, :].expand(-1, TOPK_GROUP, -1)).flatten(1)  # [q, group * width]
        top, position = values.topk(min(k, values.shape[1]), dim=1)
        # Columns only for the winners: a column tensor per candidate would double the transient memory.
        columns = ids.gather(1, position % width) + (position // width) * groups + offset
        best_values, best_indices = _keep_best(best_values, best_indices, top, columns, k)
    if num_columns > groups * TOPK_GROUP:  # the columns in no group
        values, columns = block[:, groups * TOPK_GROUP:].topk(min(k, num_columns - groups * TOPK_GROUP), dim=1)
        return _keep_best(best_values, best_indices, values, columns + offset + groups * TOPK_GROUP, k)
    assert best_values is not None and best_indices is not None
    return best_values, best_indices


def _merge_above_threshold(block: Tensor, offset: int, k: int, best_values: Tensor, best_indices: Tensor,
                           grouped: Tensor, maxima: Tensor) -> tuple[Tensor, Tensor] | None:
    """Once every row holds k scores, only block scores >= the row's k-th best can enter, and after the first
    blocks there are few per row: only the groups whose maximum reaches it are compared, and the survivors
    are packed into a [q, most per row] candidate tensor for the merge. None when they are too many to pack
    (the caller then selects from the live groups)."""
    num_rows, num_columns = block.shape
    groups = maxima.shape[1]
    threshold = best_values[:, -1]
    group_rows, group_ids = (maxima >= threshold[:, None]).nonzero(as_tuple=True)
    candidates = grouped[group_rows, :, group_ids]  # [live groups, group]
    live, member = (candidates >= threshold[group_rows, None]).nonzero(as_tuple=True)
    rows = group_rows[live]
    columns = group_ids[live] + member * groups
    if num_columns > groups * TOPK_GROUP:  # the columns in no group: compared directly
        tail_rows, tail_columns = (block[:, groups * TOPK_GROUP:] >= threshold[:, None]).nonzero(as_tuple=True)
        rows, columns = torch.cat([rows, tail_rows]), torch.cat([columns, tail_columns + groups * TOPK_GROUP])
    if rows.numel() == 0:
        return best_values, best_indices
    counts = torch.bincount(rows, minlength=num_rows)
    width = int(counts.max())
    if width > max(4 * k, num_columns // 16):
        return None
    order = torch.argsort(rows, stable=True)
    rows, columns = rows[order], columns[order]
    slot = torch.arange(rows.numel(), device=block.device) - (counts.cumsum(0) - counts)[rows]
    values = block.new_full((num_rows, width), float("-inf"))
    values[rows, slot] = block[rows, columns]
    indices = torch.zeros(values.shape, dtype=torch.long, device=block.device)
    indices[rows, slot] = columns + offset
    return _keep_best(best_values, best_indices, values, indices, k)


def _keep_best(best_values: Tensor | None, best_indices: Tensor | None, values: Tensor, indices: Tensor,
               k: int) -> tuple[Tensor, Tensor]:
    """The k best of the running lists and new candidates per row, sorted descending."""
    if best_values is not None and best_indices is not None:
        values, indices = torch.cat([best_values, values], dim=1), torch.cat([best_indices, indices], dim=1)
    elif values.shape[1] <= k:  # already one block's sorted top-k
        return values, indices
    top, keep = values.topk(min(k, values.shape[1]), dim=1)
    return top, indices.gather(1, keep)
