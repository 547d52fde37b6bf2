"""Image-text matching (ITM): negative sampling from contrastive similarities, labels and loss.

Batch layout of the 3B ITM pairs (ALBEF's order):
  rows [0, B)    positives: image i with text i;
  rows [B, 2B)   text i with a negative image ``neg_image_index[i]``;
  rows [2B, 3B)  image i with a negative text ``neg_text_index[i]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.collectives import rank_and_world
from vlp.losses.negatives import TEXT_RULES, negative_masks

__all__ = ["NegativeDraw", "draw_negatives", "sample_hard_negatives", "itm_labels", "itm_loss", "itm_pair_weights"]


def _draw(similarity: Tensor, valid: Tensor, hard: bool, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """One column per row drawn among the valid ones (softmax(similarity) weights when ``hard``), and whether
    the row had any; a row without one gets column 0 and False."""
    has = valid.any(dim=1)
    usable = valid | ~has[:, None]  # an empty row draws from all columns; the caller drops it
    if hard:
        weights = similarity.float().masked_fill(~usable, float("-inf")).softmax(dim=1)
    else:
        weights = usable.float()
    drawn = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return torch.where(has, drawn, torch.zeros_like(drawn)), has


@dataclass(frozen=True)
class NegativeDraw:
    """One negative text per image row and one negative image per text row (indices into the gathered
    columns), whether each row had a valid candidate, and the share of candidates the rule excluded
    beyond the pair itself (a measure of how many likely false negatives the batch held)."""

    text: Tensor
    image: Tensor
    has_text: Tensor
    has_image: Tensor
    excluded_fraction: float

    @property
    def rows_without_negative(self) -> int:
        return int((~self.has_text).sum() + (~self.has_image).sum())


def _check_shapes(sim_i2t: Tensor, sim_t2i: Tensor, row_offset: int | None) -> int:
    rows, columns = sim_i2t.shape
    if sim_t2i.shape != sim_i2t.shape:
        raise ValueError(f"sim_i2t {tuple(sim_i2t.shape)} and sim_t2i {tuple(sim_t2i.shape)} differ in shape")
    if row_offset is None:
        row_offset = rank_and_world()[0] * rows if columns > rows else 0
    if row_offset + rows > columns:
        raise ValueError(f"rows {row_offset}..{row_offset + rows} fall outside the {columns} similarity columns")
    return row_offset


@torch.no_grad()
def draw_negatives(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    image_ids: Tensor | None = None,
    text_keys: Tensor | None = None,
    exclusion: str = "text",
    margin: float | None = None,
    generator: torch.Generator | None = None,
    hard: bool = True,
    row_offset: int | None = None,
) -> NegativeDraw:
    """Draw ITM negatives with a false-negative-aware rule (``vlp.losses.negatives``).

    sim_i2t: [B, N] this rank's images against all N (gathered) texts; sim_t2i: [B, N] its texts against
    all images; row i's own pair is column ``row_offset + i`` (default rank * B when N > B, else 0).
    ``image_ids`` [N] (default: every column its own image) and ``text_keys`` [N, K] (``text_keys()``,
    needed by ``exclusion="text"``) describe the columns in gathered order. ``margin``: also skip
    candidates whose similarity exceeds the row's positive by more than this (likely unlabelled
    positives). With ``hard`` a negative is drawn with probability softmax(similarity) over the valid
    columns (ALBEF), else uniformly. A row with no valid candidate is reported in ``has_text`` /
    ``has_image`` (never an error): the caller drops that row's negative pair.
    """
    rows, columns = sim_i2t.shape
    offset = _check_shapes(sim_i2t, sim_t2i, row_offset)
    device = sim_i2t.device
    if image_ids is None:
        image_ids = torch.arange(columns, device=device)
    elif image_ids.shape != (columns,):
        raise ValueError(f"image_ids must hold one id per column ({columns}), got shape {tuple(image_ids.shape)}")
    if exclusion in TEXT_RULES and text_keys is None:
        exclusion = "image_id"  # no texts known: the strictest rule that can be applied
    valid_text, valid_image = negative_masks(rows, offset, image_ids, text_keys, exclusion)
    if margin is not None:
        local = torch.arange(rows, device=device)
        positive_i2t = sim_i2t[local, local + offset][:, None]
        positive_t2i = sim_t2i[local, local + offset][:, None]
        valid_text &= sim_i2t <= positive_i2t + margin
        valid_image &= sim_t2i <= positive_t2i + margin
    excluded = 1.0 - float(valid_text.sum() + valid_image.sum()) / (2 * rows * max(columns - 1, 1))
    text, has_text = _draw(sim_i2t, valid_text, hard, generator)
    image, has_image = _draw(sim_t2i, valid_image, hard, generator)
    return NegativeDraw(text, image, has_text, has_image, max(excluded, 0.0))


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    image_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
    hard: bool = True,
    row_offset: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one negative text per image and one negative image per text (ALBEF hard negatives), excluding
    the pair itself and, when ``image_ids`` [N] of the columns (gathered order) are given, every column
    sharing the row's image id; ``draw_negatives`` adds the text rule and never raises on an empty row.

    Returns (neg_text_index [B], neg_image_index [B]), indices into the N columns.
    Raises ValueError when a row has no valid negative (e.g. every caption of one image).
    """
    draw = draw_negatives(sim_i2t, sim_t2i, image_ids=image_ids, exclusion="image_id" if image_ids is not None
                          else "pair", generator=generator, hard=hard, row_offset=row_offset)
    empty = (~draw.has_text).nonzero().flatten()
    if empty.numel() > 0:
        raise ValueError(
            f"no valid ITM negative for batch rows {empty.tolist()}: every other sample shares their image id;"
            " use a larger batch or sample distinct images per batch"
        )
    return draw.text, draw.image


def itm_pair_weights(has_image: Tensor, has_text: Tensor) -> Tensor:
    """float [3B] in the ITM pair order: 1 for every positive and for each negative pair whose row had a
    valid negative, 0 for the dropped ones."""
    ones = torch.ones_like(has_image, dtype=torch.float)
    return torch.cat([ones, has_image.float(), has_text.float()])


def itm_labels(batch_size: int, device: torch.device | str | None = None) -> Tensor:
    """long [3B]: B ones (positives) then 2B zeros (text with negative image, image with negative text)."""
    labels = torch.zeros(3 * batch_size, dtype=torch.long, device=device)
    labels[:batch_size] = 1
    return labels


def itm_loss(logits: Tensor, labels: Tensor, weights: Tensor | None = None,
             normalizer: float | Tensor | None = None) -> Tensor:
    """Cross entropy of ITM logits [N, 2] (column 1 = match) against long labels [N], in fp32.

    ``weights`` [N] (0 drops a pair) give the weighted mean; ``normalizer`` replaces the sum of the
    weights as the denominator (a chunk of a larger batch divides by the whole batch's count)."""
    if logits.ndim != 2 or logits.shape[1] != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"itm_loss expects logits [N, 2] and labels [N], got {tuple(logits.shape)}, {tuple(labels.shape)}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        if weights is None and normalizer is None:
            return F.cross_entropy(logits.float(), labels)
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        weights = torch.ones_like(losses) if weights is None else weights.float()
        total = weights.sum() if normalizer is None else normalizer
        return (losses * weights).sum() / torch.as_tensor(total, device=losses.device).clamp(min=1.0)
