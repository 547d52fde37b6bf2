"""Image-text contrastive losses: softmax InfoNCE (CLIP/ALBEF ITC) and sigmoid (SigLIP).

Both normalize the embeddings themselves and compute in fp32 even under autocast. In a process
group they all-gather with gradient; all ranks must hold the same batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.collectives import gather_no_grad, gather_with_grad, rank_and_world
from vlp.layers.logit_scale import LogitScale
from vlp.losses.negatives import positive_mask
from vlp.registry import losses
from vlp.types import LossOutput

__all__ = ["contrastive_loss", "siglip_loss", "itc_loss", "sigmoid_loss", "ContrastiveLoss", "SigLipLoss"]


def _fp32_unit(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


def _as_fp32(value: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value.float()
    return torch.tensor(float(value), device=like.device)


def _gathered_ids(image_ids: Tensor | None, batch: int, device: torch.device) -> Tensor:
    """Every rank's image ids in gathered order; without ids each pair is its own image."""
    if image_ids is not None:
        return gather_no_grad(image_ids)
    return torch.arange(batch * rank_and_world()[1], device=device)


def _soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def contrastive_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor | float,
    local_loss: bool = False,
    image_ids: Tensor | None = None,
    text_keys: Tensor | None = None,
) -> Tensor:
    """Symmetric InfoNCE over L2-normalized embeddings; the value of open_clip's ``ClipLoss``.

    image_emb, text_emb: [B, E], row i of each forming a pair. ``logit_scale`` multiplies the cosine
    similarities (exp of the learned log scale, i.e. 1/temperature). The embeddings are normalized
    here, before the scale; already-normalized inputs pass through unchanged up to rounding.

    In a process group the embeddings are gathered with gradient. By default every rank computes the
    loss of the whole global batch (same value on all ranks). With ``local_loss=True`` a rank scores
    only its own rows against all columns (labels offset by rank, as open_clip's ``local_loss``): the
    per-rank values differ, their mean is the global loss, and with DDP's gradient averaging both
    variants give the single-process gradient of the global batch; the local one costs B x W*B
    instead of (W*B)^2 logits per rank.

    image_ids [B] (optional, ALBEF retrieval fine-tuning): every pair whose images share an id is
    positive; each row's target spreads evenly over its positive columns and the loss is the soft
    cross entropy. With all ids distinct this equals the default diagonal labels.
    text_keys [B, K] (optional, ``vlp.losses.negatives.text_keys``): pairs whose captions are the same text
    are positives too (a caption repeated across images describes each of them).
    """
    with torch.autocast(device_type=image_emb.device.type, enabled=False):
        image = _fp32_unit(image_emb)
        text = _fp32_unit(text_emb)
        scale = _as_fp32(logit_scale, image)
        rank, _ = rank_and_world()
        all_image = gather_with_grad(image)
        all_text = gather_with_grad(text)
        if local_loss:
            row_image, row_text, offset = image, text, rank * image.shape[0]
        else:
            row_image, row_text, offset = all_image, all_text, 0
        logits_i2t = scale * row_image @ all_text.T
        logits_t2i = scale * row_text @ all_image.T
        if image_ids is None and text_keys is None:
            labels = torch.arange(row_image.shape[0], device=image.device) + offset
            return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2
        all_ids = _gathered_ids(image_ids, image.shape[0], image.device)
        all_keys = None if text_keys is None else gather_no_grad(text_keys)
        rows = slice(offset, offset + row_image.shape[0])
        positives = positive_mask(all_ids[rows], all_ids, None if all_keys is None else all_keys[rows],
                                  all_keys).float()
        targets = positives / positives.sum(dim=1, keepdim=True)
        return (_soft_cross_entropy(logits_i2t, targets) + _soft_cross_entropy(logits_t2i, targets)) / 2


def siglip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    image_ids: Tensor | None = None,
    text_keys: Tensor | None = None,
) -> Tensor:
    """Sigmoid image-text loss, the value of open_clip's ``SigLipLoss``.

    ``-sum(logsigmoid(label * (scale * cos + bias))) / B`` over all B x B pairs, label +1 on pairs
    and -1 elsewhere; with ``image_ids`` [B] every pair sharing an image id is labelled +1, with
    ``text_keys`` [B, K] every pair whose captions are the same text.

    In a process group the texts are gathered with gradient and a rank scores its own B images
    against all W*B texts, divided by its own B. That is this rank's share of the global loss:
    the mean over ranks equals a single-process run on the global batch, and so do the gradients
    after DDP's averaging. open_clip reaches the same sum by exchanging text blocks with neighbour
    ranks instead of one all-gather.
    """
    with torch.autocast(device_type=image_emb.device.type, enabled=False):
        image = _fp32_unit(image_emb)
        text = _fp32_unit(text_emb)
        scale = _as_fp32(logit_scale, image)
        bias = _as_fp32(logit_bias, image)
        rank, _ = rank_and_world()
        all_text = gather_with_grad(text)
        logits = scale * image @ all_text.T + bias
        if image_ids is None and text_keys is None:
            batch = image.shape[0]
            positive = torch.zeros_like(logits, dtype=torch.bool)
            rows = torch.arange(batch, device=image.device)
            positive[rows, rows + rank * batch] = True
        else:
            all_ids = _gathered_ids(image_ids, image.shape[0], image.device)
            local = slice(rank * image.shape[0], (rank + 1) * image.shape[0])
            all_keys = None if text_keys is None else gather_no_grad(text_keys)
            positive = positive_mask(all_ids[local], all_ids, None if all_keys is None else all_keys[local],
                                     all_keys)
        labels = positive.float() * 2 - 1
        return -F.logsigmoid(labels * logits).sum() / image.shape[0]


class ContrastiveLoss(LogitScale):
    """Softmax image-text contrastive loss (ITC) with a learnable temperature.

    Defaults follow open_clip (temperature 0.07, scale <= 100); ALBEF uses temperature in
    [0.001, 0.5]. ``local_loss``: see :func:`contrastive_loss`.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        temperature_min: float = 0.01,
        temperature_max: float = 100.0,
        learnable: bool = True,
        local_loss: bool = False,
    ) -> None:
        super().__init__(temperature, temperature_min, temperature_max, learnable)
        self.local_loss = local_loss

    def forward(self, image_emb: Tensor, text_emb: Tensor, image_ids: Tensor | None = None) -> LossOutput:
        scale = self.logit_scale()
        loss = contrastive_loss(image_emb, text_emb, scale, local_loss=self.local_loss, image_ids=image_ids)
        return LossOutput(loss, {"itc": loss, "temperature": (1 / scale).detach()})


class SigLipLoss(LogitScale):
    """Sigmoid image-text loss with a learnable temperature and bias.

    Defaults follow the SigLIP paper's initialization: log scale ln 10 (temperature 0.1), bias -10.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        bias: float = -10.0,
        temperature_min: float = 0.01,
        temperature_max: float = 100.0,
        learnable: bool = True,
    ) -> None:
        super().__init__(temperature, temperature_min, temperature_max, learnable, bias=bias)

    def logit_bias(self) -> Tensor:
        """The learned bias added to every scaled similarity, in fp32."""
        assert self.bias is not None
        return self.bias.float()

    def forward(self, image_emb: Tensor, text_emb: Tensor, image_ids: Tensor | None = None) -> LossOutput:
        scale, bias = self.logit_scale(), self.logit_bias()
        loss = siglip_loss(image_emb, text_emb, scale, bias, image_ids=image_ids)
        terms = {"siglip": loss, "temperature": (1 / scale).detach(), "bias": bias.detach()}
        return LossOutput(loss, terms)


# The ``losses`` registry: a model's ``contrastive`` name -> its loss, a function of the embeddings and the
# model's logit scale and bias, with one signature for every entry.


@losses.register("itc")
def itc_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | None = None, *,
             image_ids: Tensor | None = None, text_keys: Tensor | None = None, local_loss: bool = False) -> Tensor:
    """``contrastive_loss`` under the registry's signature; the softmax ITC has no bias."""
    if logit_bias is not None:
        raise ValueError("the softmax ITC loss takes no logit bias (a model with one is a SigLIP model)")
    return contrastive_loss(image_emb, text_emb, logit_scale, local_loss=local_loss, image_ids=image_ids,
                            text_keys=text_keys)


@losses.register("siglip")
def sigmoid_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | None = None,
                 *, image_ids: Tensor | None = None, text_keys: Tensor | None = None,
                 local_loss: bool = False) -> Tensor:
    """``siglip_loss`` under the registry's signature (it is always a rank's local share: ``local_loss`` is moot)."""
    if logit_bias is None:
        raise ValueError("the SigLIP loss needs the model's logit bias")
    return siglip_loss(image_emb, text_emb, logit_scale, logit_bias, image_ids=image_ids, text_keys=text_keys)
