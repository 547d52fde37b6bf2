"""Image-text matching (ITM): negative sampling from contrastive similarities, labels and loss.

Batch layout of the 3B ITM pairs (ALBEF's order):
  rows [0, B)    positives: image i with text i;
  rows [B, 2B)   text i with a negative image ``neg_image_index[i]``;
  rows [2B, 3B)  image i with a negative text ``neg_text_index[i]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.losses.gather import rank_and_world

__all__ = ["sample_hard_negatives", "itm_labels", "itm_loss"]


def _negative_mask(rows: int, columns: int, offset: int, image_ids: Tensor | None, device: torch.device) -> Tensor:
    """bool [rows, columns], True where column j may serve as a negative for row i."""
    row_index = torch.arange(rows, device=device)
    valid = torch.ones(rows, columns, dtype=torch.bool, device=device)
    valid[row_index, row_index + offset] = False
    if image_ids is not None:
        row_ids = image_ids[offset : offset + rows]
        valid &= row_ids[:, None] != image_ids[None, :]
    return valid


def _draw(similarity: Tensor, valid: Tensor, hard: bool, generator: torch.Generator | None) -> Tensor:
    if hard:
        weights = similarity.float().masked_fill(~valid, float("-inf")).softmax(dim=1)
    else:
        weights = valid.float()
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    image_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
    hard: bool = True,
    row_offset: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one negative text per image and one negative image per text (ALBEF hard negatives).

    sim_i2t: [B, B_all] this rank's images against all texts (B_all = W*B when gathered across W
    ranks); sim_t2i: [B, B_all] this rank's texts against all images. Row i's positive sits in
    column ``row_offset + i``; ``row_offset`` defaults to rank * B when B_all > B, else 0.
    With ``hard=True`` a negative is drawn with probability softmax(similarity) over the valid
    columns (the positive excluded, and when ``image_ids`` [B_all] of the columns, in gathered
    order, are given every column sharing the row's image id), so confusable pairs come up more
    often; ``hard=False`` draws uniformly among the valid columns.

    Returns (neg_text_index [B], neg_image_index [B]), indices into the B_all columns.
    Raises ValueError when a row has no valid negative (e.g. every caption of one image).
    """
    rows, columns = sim_i2t.shape
    if sim_t2i.shape != sim_i2t.shape:
        raise ValueError(f"sim_i2t {tuple(sim_i2t.shape)} and sim_t2i {tuple(sim_t2i.shape)} differ in shape")
    if row_offset is None:
        row_offset = rank_and_world()[0] * rows if columns > rows else 0
    if row_offset + rows > columns:
        raise ValueError(f"rows {row_offset}..{row_offset + rows} fall outside the {columns} similarity columns")
    if image_ids is not None and image_ids.shape != (columns,):
        raise ValueError(f"image_ids must hold one id per column ({columns}), got shape {tuple(image_ids.shape)}")
    valid = _negative_mask(rows, columns, row_offset, image_ids, sim_i2t.device)
    empty = (~valid.any(dim=1)).nonzero().flatten()
    if empty.numel() > 0:
        raise ValueError(
            f"no valid ITM negative for batch rows {empty.tolist()}: every other sample shares their image id;"
            " use a larger batch or sample distinct images per batch"
        )
    return _draw(sim_i2t, valid, hard, generator), _draw(sim_t2i, valid, hard, generator)


def itm_labels(batch_size: int, device: torch.device | str | None = None) -> Tensor:
    """long [3B]: B ones (positives) then 2B zeros (text with negative image, image with negative text)."""
    labels = torch.zeros(3 * batch_size, dtype=torch.long, device=device)
    labels[:batch_size] = 1
    return labels


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross entropy of ITM logits [N, 2] (column 1 = match) against long labels [N], in fp32."""
    if logits.ndim != 2 or logits.shape[1] != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"itm_loss expects logits [N, 2] and labels [N], got {tuple(logits.shape)}, {tuple(labels.shape)}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.cross_entropy(logits.float(), labels)
