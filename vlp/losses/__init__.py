"""Losses: contrastive (ITC, SigLIP), matching (ITM), MLM, momentum distillation (their
cross-rank gathers are in ``vlp.collectives``)."""

from vlp.losses.contrastive import (
    ContrastiveLoss,
    SigLipLoss,
    contrastive_loss,
    itc_loss,
    siglip_loss,
    sigmoid_loss,
)
from vlp.losses.distill import FeatureQueue, soft_cross_entropy, soft_targets
from vlp.losses.matching import (
    NegativeDraw,
    draw_negatives,
    itm_labels,
    itm_loss,
    itm_pair_weights,
    sample_hard_negatives,
)
from vlp.losses.mlm import mask_tokens, mlm_loss
from vlp.losses.negatives import negative_masks, text_keys
from vlp.losses.vqa import vqa_loss

__all__ = [
    "contrastive_loss",
    "siglip_loss",
    "itc_loss",
    "sigmoid_loss",
    "ContrastiveLoss",
    "SigLipLoss",
    "sample_hard_negatives",
    "draw_negatives",
    "NegativeDraw",
    "itm_pair_weights",
    "text_keys",
    "negative_masks",
    "itm_labels",
    "itm_loss",
    "mask_tokens",
    "mlm_loss",
    "soft_targets",
    "soft_cross_entropy",
    "FeatureQueue",
    "vqa_loss",
]
