"""Per-step ITM diagnostics (accuracy on positives and on kept negatives, the label prior's loss, the exclusion
rule's share) and the rows of a negative draw that one chunk of the gradient-cache step reads."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vlp.losses import NegativeDraw

__all__ = ["ItmStats", "draw_rows"]


class ItmStats:
    """Running ITM accuracies of one step, on positives and on the kept negatives (a head that predicts
    only the label prior shows 0 on positives)."""

    def __init__(self) -> None:
        self.counts = [0.0, 0.0, 0.0, 0.0]  # correct positives, positives, correct negatives, negatives

    @torch.no_grad()
    def add(self, logits: Tensor, labels: Tensor, weights: Tensor | None) -> None:
        kept = torch.ones_like(labels, dtype=torch.bool) if weights is None else weights > 0
        correct = (logits.argmax(dim=1) == labels) & kept
        positive = labels == 1
        parts = torch.stack([correct & positive, kept & positive, correct & ~positive, kept & ~positive])
        # one host copy per call (on CUDA each float() of a sum would wait for the device separately)
        for slot, value in enumerate(parts.sum(dim=1).tolist()):
            self.counts[slot] += float(value)

    def terms(self, draw: NegativeDraw | None, device: torch.device) -> dict[str, Tensor]:
        if draw is None:
            return {}
        right_pos, pos, right_neg, neg = self.counts
        ratio = pos / max(pos + neg, 1.0)
        # the ITM loss of a head that predicts only the kept pairs' label ratio (1:2 when no pair is dropped)
        prior = -sum(q * math.log(q) for q in (ratio, 1.0 - ratio) if q > 0)
        values = {"itm_acc_pos": right_pos / max(pos, 1.0), "itm_acc_neg": right_neg / max(neg, 1.0),
                  "itm_label_prior": prior,
                  "itm_excluded_fraction": draw.excluded_fraction,
                  "itm_rows_without_negative": float(draw.rows_without_negative)}
        return {key: torch.tensor(value, device=device) for key, value in values.items()}


def draw_rows(draw: NegativeDraw, rows: slice) -> NegativeDraw:
    return NegativeDraw(draw.text[rows], draw.image[rows], draw.has_text[rows], draw.has_image[rows],
                        draw.excluded_fraction)
