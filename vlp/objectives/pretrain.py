"""The pretraining objective: ITC (or SigLIP) + ITM with hard negatives + optional MLM and momentum distillation.

The objective owns the step's math: ``training_step`` runs forward and backward, and
``after_optimizer_step`` updates the momentum encoder and feature queue. It is an ``nn.Module`` whose
``forward(batch)`` computes the losses, so the trainer can wrap it in DistributedDataParallel.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.config.schema import ObjectiveConfig
from vlp.losses import (
    FeatureQueue,
    contrastive_loss,
    gather_no_grad,
    gather_with_grad,
    itm_labels,
    itm_loss,
    mask_tokens,
    mlm_loss,
    sample_hard_negatives,
    siglip_loss,
    soft_cross_entropy,
)
from vlp.models.vlp_model import VLPModel
from vlp.objectives.base import Objective
from vlp.types import EncoderOutput, LossOutput

__all__ = ["PretrainObjective"]

MOMENTUM_PARTS = ("image_encoder", "image_proj", "text_encoder", "text_proj")


def _gather_tokens(out: EncoderOutput) -> EncoderOutput:
    """Gather token states (with gradient) and masks across ranks, padding to the longest sequence."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return out
    length = torch.tensor([out.tokens.shape[1]], device=out.tokens.device)
    longest = int(gather_no_grad(length).max())
    pad = longest - out.tokens.shape[1]
    tokens = F.pad(out.tokens, (0, 0, 0, pad))
    mask = F.pad(out.mask, (0, pad), value=False)
    return EncoderOutput(gather_with_grad(tokens), gather_no_grad(mask), gather_with_grad(out.pooled))


class PretrainObjective(Objective):
    def __init__(self, model: VLPModel, config: ObjectiveConfig,
                 autocast: Callable[[], AbstractContextManager[Any]] | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(autocast)
        self.model = model
        self.config = config
        self.generator = generator
        self.use_itm = config.itm_weight > 0 and model.itm_head is not None
        self.use_mlm = config.mlm_weight > 0 and model.mlm_head is not None
        self.momentum: nn.ModuleDict | None = None
        self.queue: FeatureQueue | None = None
        if config.momentum > 0:
            parts = {name: copy.deepcopy(getattr(model, name)) for name in MOMENTUM_PARTS}
            self.momentum = nn.ModuleDict(parts)
            for param in self.momentum.parameters():
                param.requires_grad_(False)
            if config.queue_size > 0:
                dim = model.image_proj(torch.zeros(1, model.image_encoder.embed_dim)).shape[-1]
                self.queue = FeatureQueue(dim, config.queue_size)

    # persistence of the objective's own state (momentum encoder, queue) ---------------------------
    def extra_state_dict(self) -> dict[str, Tensor]:
        state = {}
        if self.momentum is not None:
            state.update({f"momentum.{k}": v for k, v in self.momentum.state_dict().items()})
        if self.queue is not None:
            state.update({f"queue.{k}": v for k, v in self.queue.state_dict().items()})
        return state

    def load_extra_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.momentum is not None:
            self.momentum.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("momentum.")})
        if self.queue is not None:
            self.queue.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("queue.")})

    # the step ----------------------------------------------------------------------------------
    def after_backward(self) -> None:
        pending = getattr(self, "_pending_enqueue", None)
        if self.queue is not None and pending is not None:  # ALBEF enqueues after every forward
            self.queue.enqueue(*pending)
            self._pending_enqueue = None

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.momentum is None:
            return
        m = self.config.momentum
        for name in MOMENTUM_PARTS:
            online = getattr(self.model, name)
            for p_m, p in zip(self.momentum[name].parameters(), online.parameters()):
                p_m.mul_(m).add_(p.detach(), alpha=1 - m)

    def forward(self, batch: dict[str, Tensor]) -> LossOutput:
        model, cfg = self.model, self.config
        images, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"].bool()
        image_ids = batch.get("image_ids")
        image_out, image_emb = model.image_features(images)
        text_out, text_emb = model.text_features(ids, mask)
        terms: dict[str, Tensor] = {}
        all_ids = gather_no_grad(image_ids) if image_ids is not None else None
        terms["itc"] = self._contrastive(images, ids, mask, image_emb, text_emb, image_ids)
        total = cfg.itc_weight * terms["itc"]
        if self.use_itm:
            terms["itm"] = self._matching(image_out, text_out, image_emb, text_emb, all_ids, image_ids)
            total = total + cfg.itm_weight * terms["itm"]
        if self.use_mlm:
            terms["mlm"] = self._mlm(ids, mask, image_out)
            total = total + cfg.mlm_weight * terms["mlm"]
        terms["temperature"] = (1.0 / model.logit_scale()).detach().float()
        return LossOutput(total, terms)

    def _contrastive(self, images: Tensor, ids: Tensor, mask: Tensor, image_emb: Tensor, text_emb: Tensor,
                     image_ids: Tensor | None) -> Tensor:
        model, cfg = self.model, self.config
        if model.config is not None and model.config.contrastive == "siglip":
            return siglip_loss(image_emb, text_emb, model.logit_scale(), model.temperature.logit_bias(),  # type: ignore[operator]
                               image_ids=image_ids)
        if self.momentum is None:
            # captions of one image are all positives (ALBEF's retrieval fine-tuning uses the same targets)
            return contrastive_loss(image_emb, text_emb, model.logit_scale(), local_loss=cfg.local_loss,
                                    image_ids=image_ids)
        return self._distilled_contrastive(images, ids, mask, image_emb, text_emb, image_ids)

    def _distilled_contrastive(self, images: Tensor, ids: Tensor, mask: Tensor, image_emb: Tensor, text_emb: Tensor,
                               image_ids: Tensor | None) -> Tensor:
        """ALBEF's ITC with momentum pseudo-targets over the gathered batch plus the feature queue."""
        assert self.momentum is not None
        scale = self.model.logit_scale()
        with torch.no_grad():
            mom = self.momentum
            image_m = F.normalize(mom["image_proj"](mom["image_encoder"](images).pooled).float(), dim=-1)
            text_m = F.normalize(mom["text_proj"](mom["text_encoder"](ids, mask).pooled).float(), dim=-1)
            image_m_all, text_m_all = gather_no_grad(image_m), gather_no_grad(text_m)
            local_ids = image_ids if image_ids is not None else torch.arange(len(images), device=images.device)
            ids_all = gather_no_grad(local_ids)
            if image_ids is None:  # without ids every gathered row is its own image
                ids_all = torch.arange(len(ids_all), device=images.device)
                rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
                local_ids = ids_all[rank * len(images):(rank + 1) * len(images)]
            if self.queue is not None:
                q_image, q_text, q_ids = self.queue.features()
                image_bank, text_bank = torch.cat([image_m_all, q_image]), torch.cat([text_m_all, q_text])
                id_bank = torch.cat([ids_all, q_ids])
            else:
                image_bank, text_bank, id_bank = image_m_all, text_m_all, ids_all
            positives = (local_ids[:, None] == id_bank[None, :]).float()
            positives = positives / positives.sum(1, keepdim=True)
            alpha = self.config.distill_alpha
            target_i2t = alpha * F.softmax(image_m @ text_bank.T * scale, dim=1) + (1 - alpha) * positives
            target_t2i = alpha * F.softmax(text_m @ image_bank.T * scale, dim=1) + (1 - alpha) * positives
        loss_i2t = soft_cross_entropy(image_emb @ text_bank.T * scale, target_i2t)
        loss_t2i = soft_cross_entropy(text_emb @ image_bank.T * scale, target_t2i)
        if self.queue is not None:
            self._pending_enqueue = (image_m_all, text_m_all, ids_all)
        return (loss_i2t + loss_t2i) / 2

    def _matching(self, image_out: EncoderOutput, text_out: EncoderOutput, image_emb: Tensor, text_emb: Tensor,
                  all_ids: Tensor | None, image_ids: Tensor | None) -> Tensor:
        """ITM over B positives and 2B negatives mined from the (global) contrastive similarities."""
        model = self.model
        batch = image_emb.shape[0]
        with torch.no_grad():
            scale = model.logit_scale()
            image_all, text_all = gather_no_grad(image_emb), gather_no_grad(text_emb)
            sim_i2t = image_emb @ text_all.T * scale
            sim_t2i = text_emb @ image_all.T * scale
            neg_text, neg_image = sample_hard_negatives(
                sim_i2t.float(), sim_t2i.float(), image_ids=all_ids, generator=self.generator,
                hard=self.config.hard_negatives,
            )
        image_glob, text_glob = _gather_tokens(image_out), _gather_tokens(text_out)
        pair_text = _cat_tokens([text_out, _select(text_out, text_glob, None), _select(text_out, text_glob, neg_text)])
        pair_image = _cat_tokens([image_out, _select(image_out, image_glob, neg_image), image_out])
        logits = model.itm_scores(model.fuse(pair_text, pair_image))
        return itm_loss(logits, itm_labels(batch, device=logits.device))

    def _mlm(self, ids: Tensor, mask: Tensor, image_out: EncoderOutput) -> Tensor:
        model = self.model
        tok = model.tokenizer
        masked, labels = mask_tokens(ids, mask, tok.mask_id, tok.special_ids, model.text_encoder.vocab_size,
                                     probability=self.config.mlm_probability, generator=self.generator)
        text_out = model.text_encoder(masked, mask)
        fused = model.fuse(text_out, image_out)
        assert model.mlm_head is not None
        return mlm_loss(model.mlm_head(fused.text).float(), labels)


def _select(local: EncoderOutput, gathered: EncoderOutput, index: Tensor | None) -> EncoderOutput:
    if index is None:  # the local text again, paired with a negative image
        return local
    return EncoderOutput(gathered.tokens[index], gathered.mask[index], gathered.pooled[index])


def _cat_tokens(parts: list[EncoderOutput]) -> EncoderOutput:
    longest = max(p.tokens.shape[1] for p in parts)
    tokens = torch.cat([F.pad(p.tokens, (0, 0, 0, longest - p.tokens.shape[1])) for p in parts])
    mask = torch.cat([F.pad(p.mask, (0, longest - p.mask.shape[1]), value=False) for p in parts])
    return EncoderOutput(tokens, mask, torch.cat([p.pooled for p in parts]))
