"""The pretraining objective: ITC (or SigLIP) + ITM with hard negatives + optional MLM and momentum distillation.

The objective owns the step's math: ``training_step`` runs forward and backward, and
``after_optimizer_step`` updates the momentum encoder and feature queue. It is an ``nn.Module`` whose
``forward(batch)`` computes the losses, so the trainer can wrap it in DistributedDataParallel.
With ``chunk_size > 0`` a micro-batch larger than the chunk takes the gradient-cache step
(``training_step_chunked``): the full-batch contrastive gradient with the activations of one chunk.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from vlp.collectives import gather_no_grad, rank_and_world, sync_gradients
from vlp.config.schema import ObjectiveConfig
from vlp.encoders.base import ImageEncoder, TextEncoder
from vlp.encoders.patch_dropout import set_patch_dropout
from vlp.losses import (
    FeatureQueue,
    NegativeDraw,
    draw_negatives,
    itm_labels,
    itm_loss,
    itm_pair_weights,
    mask_tokens,
    mlm_loss,
    soft_cross_entropy,
    text_keys,
)
from vlp.losses.mlm import IGNORE_INDEX
from vlp.losses.negatives import TEXT_RULES
from vlp.models.vlp_model import VLPModel
from vlp.objectives.base import Objective
from vlp.objectives.gradcache import (
    RngSnapshot,
    chunk_slices,
    gather_tokens,
    take_rows,
)
from vlp.objectives.itm_stats import ItmStats
from vlp.objectives.itm_stats import draw_rows as _draw_rows
from vlp.objectives.negative_pool import NegativePool
from vlp.objectives.teacher import Teacher, load_teacher
from vlp.registry import losses
from vlp.types import EncoderOutput, FusionOutput, LossOutput

__all__ = ["PretrainObjective"]

MOMENTUM_PARTS = ("image_encoder", "image_proj", "text_encoder", "text_proj")


class PretrainObjective(Objective):
    """``chunk_size`` (``train.contrastive_chunk_size``): 0 = whole micro-batch at once; C > 0 = the
    gradient-cache step for micro-batches of more than C rows (see ``training_step_chunked``)."""

    def __init__(self, model: VLPModel, config: ObjectiveConfig,
                 autocast: Callable[[], AbstractContextManager[Any]] | None = None,
                 generator: torch.Generator | None = None, chunk_size: int = 0) -> None:
        super().__init__(autocast)
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0, got {chunk_size}")
        self.model = model
        self.config = config
        self.generator = generator
        self.chunk_size = chunk_size
        self._pending_enqueue: tuple[Tensor, Tensor, Tensor] | None = None
        self.use_itm = config.itm_weight > 0 and model.itm_head is not None
        self.use_mlm = config.mlm_weight > 0 and model.mlm_head is not None
        # ITC alone reads only the pooled embeddings: the encoders' last blocks then skip the other rows
        self.embeddings_only = not (self.use_itm or self.use_mlm)
        if config.patch_dropout > 0:
            set_patch_dropout(model.image_encoder, config.patch_dropout)
        self.teacher: Teacher | None = load_teacher(config.distill_from, model) if config.distill_from else None
        self.pool = NegativePool(config.itm_negative_pool) if self.use_itm and config.itm_negative_pool > 0 else None
        self.optimizer_steps = 0  # counted for objective.itm_pool_start; saved with the pool
        self.momentum: nn.ModuleDict | None = None
        self.queue: FeatureQueue | None = None
        if config.momentum > 0:
            parts = {name: copy.deepcopy(getattr(model, name)) for name in MOMENTUM_PARTS}
            self.momentum = nn.ModuleDict(parts)
            set_patch_dropout(self.momentum["image_encoder"], 0.0)  # its targets see every patch
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
        if self.pool is not None:
            state.update({f"itm_pool.{k}": v for k, v in self.pool.state_dict().items()})
            state["itm_pool.optimizer_steps"] = torch.tensor(self.optimizer_steps)
        return state

    def load_extra_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.momentum is not None:
            self.momentum.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("momentum.")})
        if self.queue is not None:
            self.queue.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("queue.")})
        if self.pool is not None:
            pool_state = {k[9:]: v for k, v in state.items() if k.startswith("itm_pool.")}
            self.optimizer_steps = int(pool_state.pop("optimizer_steps", torch.tensor(0)))
            self.pool.load_state_dict(pool_state)

    # the step ----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], scale: float = 1.0) -> LossOutput:
        if 0 < self.chunk_size < batch["images"].shape[0]:
            return self.training_step_chunked(batch, scale, self.chunk_size)
        return super().training_step(batch, scale)

    def after_backward(self) -> None:
        pending = self._pending_enqueue
        if self.queue is not None and pending is not None:  # ALBEF enqueues after every forward
            self.queue.enqueue(*pending)
            self._pending_enqueue = None

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.optimizer_steps += 1
        if self.momentum is None:
            return
        m = self.config.momentum
        for name in MOMENTUM_PARTS:
            online = getattr(self.model, name)
            for p_m, p in zip(self.momentum[name].parameters(), online.parameters()):
                p_m.mul_(m).add_(p.detach(), alpha=1 - m)

    def forward(self, batch: dict[str, Tensor]) -> LossOutput:
        model = self.model
        images, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"].bool()
        image_ids = batch.get("image_ids")
        keys = self._text_keys(batch)
        masked, labels = self._mask(ids, mask) if self.use_mlm else (None, None)
        image_out, image_emb = model.image_features(images, pooled_only=self.embeddings_only)
        text_out, text_emb, masked_out = self._text_features(ids, mask, masked)
        momentum = self._momentum_embeddings(images, ids, mask) if self.momentum is not None else None
        terms: dict[str, Tensor] = {"itc": self._contrastive(image_emb, text_emb, image_ids, momentum, keys)}
        terms.update(self._distill(image_emb, text_emb, batch))
        negatives, draw, stats = None, None, ItmStats()
        if self.use_itm:
            draw = self._negatives(image_emb, text_emb, image_ids, keys)
            text_all, image_all = gather_tokens(text_out), gather_tokens(image_out)
            if self._pool_active():
                assert self.pool is not None
                draw, text_all, image_all = self.pool.extend(model, draw, image_all.tokens.shape[0], text_all, image_all)
            negatives = (text_all.select(draw.text), image_all.select(draw.image))
            shared = (image_all, draw.image, rank_and_world()[0] * image_out.tokens.shape[0])
            self._remember(batch, image_ids, keys, image_emb, text_emb)
        terms.update(self._fused_terms(text_out, image_out, negatives, masked_out, labels,
                                       shared if self.use_itm else None, draw, stats=stats))
        total = self._weighted(terms)
        terms["temperature"] = (1.0 / model.logit_scale()).detach().float()
        terms.update(stats.terms(draw, total.device))
        return LossOutput(total, terms)

    def training_step_chunked(self, batch: dict[str, Tensor], scale: float = 1.0,
                              chunk_size: int | None = None) -> LossOutput:
        """The gradient-cache step (forward + backward) in chunks of ``chunk_size`` rows (default: the
        objective's ``chunk_size``).

        1. Embed every chunk under ``no_grad`` (and the momentum features), saving the RNG state first.
        2. The contrastive loss of the whole micro-batch (gathered across ranks as usual) on the embeddings
           as leaf tensors; its backward leaves d loss / d embedding on them and fills the temperature's
           (and SigLIP bias's) gradient.
        3. Per chunk, replay the RNG state, re-encode with activations, and backpropagate the cached
           embedding gradients together with the chunk's ITM and MLM terms.

        The contrastive gradient equals the full-batch gradient exactly. ITM negatives are mined from the
        full (global) similarities as usual, but a negative that belongs to another chunk (or rank) is
        taken from the detached step-1 states and carries no gradient; the ITM and MLM losses themselves
        are the full-batch values (each chunk's share weighted by its rows / masked tokens).
        With DistributedDataParallel the passes bypass its hooks and the gradients are averaged at the end.
        """
        model = self.model
        images, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"].bool()
        image_ids = batch.get("image_ids")
        keys = self._text_keys(batch)
        batch_size = images.shape[0]
        chunks = chunk_slices(batch_size, chunk_size or self.chunk_size or batch_size)
        masked, labels = self._mask(ids, mask) if self.use_mlm else (None, None)
        snapshots: list[RngSnapshot] = []
        image_outs: list[EncoderOutput] = []
        text_outs: list[EncoderOutput] = []
        embeddings: list[tuple[Tensor, Tensor]] = []
        momentum_parts: list[tuple[Tensor, Tensor]] = []
        with torch.no_grad(), self.autocast():
            for rows in chunks:
                snapshots.append(RngSnapshot(images.device))
                image_out, image_emb = model.image_features(images[rows], pooled_only=self.embeddings_only)
                text_out, text_emb, _ = self._text_features(ids[rows], mask[rows], _part(masked, rows))
                embeddings.append((image_emb, text_emb))
                if self.use_itm:  # the states an ITM negative from another chunk is read from
                    image_outs.append(image_out)
                    text_outs.append(text_out)
                if self.momentum is not None:
                    momentum_parts.append(self._momentum_embeddings(images[rows], ids[rows], mask[rows]))
        image_leaf = torch.cat([e[0] for e in embeddings]).requires_grad_()
        text_leaf = torch.cat([e[1] for e in embeddings]).requires_grad_()
        momentum = None
        if momentum_parts:
            momentum = (torch.cat([m[0] for m in momentum_parts]), torch.cat([m[1] for m in momentum_parts]))
        with self.autocast():
            itc = self._contrastive(image_leaf, text_leaf, image_ids, momentum, keys)
            distill = self._distill(image_leaf, text_leaf, batch)
        (self._weighted({"itc": itc, **distill}) * scale).backward()
        assert image_leaf.grad is not None and text_leaf.grad is not None
        image_grad, text_grad = image_leaf.grad, text_leaf.grad
        terms: dict[str, Tensor] = {"itc": itc.detach(), **{k: v.detach() for k, v in distill.items()}}

        draw, stats, itm_count = None, ItmStats(), None
        if self.use_itm:
            draw = self._negatives(image_leaf.detach(), text_leaf.detach(), image_ids, keys)
            itm_count = float(itm_pair_weights(draw.has_image, draw.has_text).sum())
            cached_text = gather_tokens(EncoderOutput.cat(text_outs), with_grad=False)
            cached_image = gather_tokens(EncoderOutput.cat(image_outs), with_grad=False)
            offset = rank_and_world()[0] * batch_size
            if self._pool_active():
                assert self.pool is not None
                with self.autocast():
                    draw, cached_text, cached_image = self.pool.extend(model, draw, cached_image.tokens.shape[0],
                                                                       cached_text, cached_image)
            self._remember(batch, image_ids, keys, image_leaf, text_leaf)
        selected = 1 if labels is None else max(int((labels != IGNORE_INDEX).sum()), 1)
        for rows, snapshot in zip(chunks, snapshots):
            with self.autocast():
                with snapshot.restored():
                    image_out, image_emb = model.image_features(images[rows], pooled_only=self.embeddings_only)
                    text_out, text_emb, masked_out = self._text_features(ids[rows], mask[rows], _part(masked, rows))
                surrogate = (image_emb * image_grad[rows]).sum() + (text_emb * text_grad[rows]).sum()
                negatives = None
                if draw is not None:
                    start = offset + rows.start
                    negatives = (take_rows(text_out, cached_text, draw.text[rows], start),
                                 take_rows(image_out, cached_image, draw.image[rows], start))
                chunk_labels = _part(labels, rows)
                # each chunk's share of the batch means: ITM divides by the whole batch's pair count already,
                # MLM's share is its masked tokens
                share = {"itm": 1.0,
                         "mlm": 0.0 if chunk_labels is None else int((chunk_labels != IGNORE_INDEX).sum()) / selected}
                chunk_draw = None if draw is None else _draw_rows(draw, rows)
                parts = {key: value * share[key]
                         for key, value in self._fused_terms(text_out, image_out, negatives, masked_out,
                                                             chunk_labels, draw=chunk_draw, itm_count=itm_count,
                                                             stats=stats).items()}
                if parts:
                    surrogate = surrogate + scale * self._weighted(parts)
                for key, value in parts.items():
                    terms[key] = terms[key] + value.detach() if key in terms else value.detach()
            if surrogate.requires_grad:  # False only when every part that makes the embeddings is frozen
                surrogate.backward()
        if isinstance(self.engine, DistributedDataParallel):
            sync_gradients(self.parameters())
        self.after_backward()
        total = self._weighted(terms)
        terms["temperature"] = (1.0 / model.logit_scale()).detach().float()
        terms.update(stats.terms(draw, total.device))
        return LossOutput(total, terms)

    # the loss terms ----------------------------------------------------------------------------
    def _text_keys(self, batch: dict[str, Any]) -> Tensor | None:
        """The batch's text keys [B, 2] when a rule compares texts (ITM exclusion or ITC text positives)."""
        cfg = self.config
        if not ((self.use_itm and cfg.negative_exclusion in TEXT_RULES) or cfg.itc_text_positives):
            return None
        given = batch.get("text_keys")  # computed by the collator in the loader workers
        if isinstance(given, Tensor) and given.shape[0] == batch["input_ids"].shape[0]:
            return given
        return text_keys(batch["input_ids"], batch["attention_mask"], batch.get("captions"))

    def _contrastive(self, image_emb: Tensor, text_emb: Tensor, image_ids: Tensor | None,
                     momentum: tuple[Tensor, Tensor] | None, keys: Tensor | None = None) -> Tensor:
        model, cfg = self.model, self.config
        keys = keys if cfg.itc_text_positives else None
        if momentum is None or model.contrastive != "itc":
            # captions of one image are all positives (ALBEF's retrieval fine-tuning uses the same targets)
            return losses.get(model.contrastive)(image_emb, text_emb, model.logit_scale(), model.logit_bias(),
                                                 image_ids=image_ids, text_keys=keys, local_loss=cfg.local_loss)
        return self._distilled_contrastive(image_emb, text_emb, *momentum, image_ids)

    def _distill(self, image_emb: Tensor, text_emb: Tensor, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The teacher-distillation term (``objective.distill_from``), or none."""
        if self.teacher is None:
            return {}
        loss = self.teacher.distill_loss(image_emb, text_emb, self.model.logit_scale(), batch["images"],
                                         batch.get("captions"), self.config.local_loss, self.chunk_size)
        return {"distill": loss}

    @torch.no_grad()
    def _momentum_embeddings(self, images: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        assert self.momentum is not None
        mom = self.momentum
        # the momentum towers give ITC targets only: their last blocks compute just the pooled rows
        image_encoder = cast(ImageEncoder, mom["image_encoder"])
        text_encoder = cast(TextEncoder, mom["text_encoder"])
        image_out = image_encoder.encode(images, pooled_only=True)
        text_out = text_encoder.encode(ids, mask, pooled_only=True)
        image_m = F.normalize(mom["image_proj"](image_out.pooled).float(), dim=-1)
        text_m = F.normalize(mom["text_proj"](text_out.pooled).float(), dim=-1)
        return image_m, text_m

    def _distilled_contrastive(self, image_emb: Tensor, text_emb: Tensor, image_m: Tensor, text_m: Tensor,
                               image_ids: Tensor | None) -> Tensor:
        """ALBEF's ITC with momentum pseudo-targets over the gathered batch plus the feature queue."""
        scale = self.model.logit_scale()
        device, batch = image_emb.device, image_emb.shape[0]
        with torch.no_grad():
            image_m_all, text_m_all = gather_no_grad(image_m), gather_no_grad(text_m)
            local_ids = image_ids if image_ids is not None else torch.arange(batch, device=device)
            ids_all = gather_no_grad(local_ids)
            if image_ids is None:  # without ids every gathered row is its own image
                ids_all = torch.arange(len(ids_all), device=device)
                rank = rank_and_world()[0]
                local_ids = ids_all[rank * batch:(rank + 1) * batch]
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

    @torch.no_grad()
    def _negatives(self, image_emb: Tensor, text_emb: Tensor, image_ids: Tensor | None,
                   keys: Tensor | None) -> NegativeDraw:
        """A negative text per image row and a negative image per text row (indices into the gathered
        batch, then the negative pool's rows when it is in use), drawn from the contrastive similarities
        under ``objective.negative_exclusion``."""
        cfg = self.config
        scale = self.model.logit_scale()
        image_all, text_all = gather_no_grad(image_emb.float()), gather_no_grad(text_emb.float())
        columns = len(image_all)
        all_ids = gather_no_grad(image_ids) if image_ids is not None else None
        all_keys = gather_no_grad(keys) if keys is not None else None
        if self._pool_active():
            assert self.pool is not None
            pool = self.pool.candidates()
            image_all, text_all = torch.cat([image_all, pool.image_emb]), torch.cat([text_all, pool.text_emb])
            batch_ids = all_ids if all_ids is not None else torch.arange(columns, device=image_all.device)
            all_ids = torch.cat([batch_ids, pool.image_ids])
            all_keys = torch.cat([all_keys, pool.text_keys]) if all_keys is not None and pool.text_keys is not None \
                else None
        cos_i2t, cos_t2i = (image_emb.float() @ text_all.T), (text_emb.float() @ image_all.T)
        margin = cfg.negative_margin * float(scale) if cfg.negative_margin >= 0 else None
        return draw_negatives(cos_i2t * scale, cos_t2i * scale, image_ids=all_ids, text_keys=all_keys,
                              exclusion=cfg.negative_exclusion, margin=margin, generator=self.generator,
                              hard=cfg.hard_negatives, row_offset=rank_and_world()[0] * image_emb.shape[0])

    def _pool_active(self) -> bool:
        """Whether this step's ITM negatives are mined from the pool too: training, past
        ``objective.itm_pool_start`` optimizer steps, and something in it."""
        return (self.pool is not None and self.training and len(self.pool) > 0
                and self.optimizer_steps >= self.config.itm_pool_start)

    def _remember(self, batch: dict[str, Tensor], image_ids: Tensor | None, keys: Tensor | None,
                  image_emb: Tensor, text_emb: Tensor) -> None:
        """Put this step's local pairs in the negative pool (after they were mined against it)."""
        if self.pool is not None and self.training:
            self.pool.add(batch["images"], batch["input_ids"], batch["attention_mask"], image_ids, keys,
                          image_emb, text_emb)

    def _text_features(self, ids: Tensor, mask: Tensor, masked: Tensor | None
                       ) -> tuple[EncoderOutput, Tensor, EncoderOutput | None]:
        """The text's encoder output and embedding and, for MLM, the masked text's output, from one encoder
        call: weights used once per step get their gradient accumulated at once, while a second use would
        hold a parameter-sized gradient buffer until the first use's backward reaches them."""
        if masked is None:
            out, emb = self.model.text_features(ids, mask, pooled_only=self.embeddings_only)
            return out, emb, None
        both, emb = self.model.text_features(torch.cat([ids, masked]), torch.cat([mask, mask]))
        rows = ids.shape[0]
        return both.select(slice(0, rows)), emb[:rows], both.select(slice(rows, 2 * rows))

    def _fused_terms(self, text_out: EncoderOutput, image_out: EncoderOutput,
                     negatives: tuple[EncoderOutput, EncoderOutput] | None, masked_out: EncoderOutput | None,
                     labels: Tensor | None, shared: tuple[EncoderOutput, Tensor, int] | None = None,
                     draw: NegativeDraw | None = None, itm_count: float | None = None,
                     stats: ItmStats | None = None) -> dict[str, Tensor]:
        """ITM over B positives and 2B negatives (ALBEF's row order, see vlp.losses.matching; ``negatives``
        = (negative texts, negative images)) and MLM of the masked text, all pairs in one fusion call (one
        use of the fusion weights, as for the text encoder).

        ``shared`` = (gathered image outputs, negative image indices into them, this rank's first row): every
        pair's image is a row of the gathered batch, so the fusion reads the distinct images by index and a
        one-way fusion projects their keys/values once instead of once per pair (3B or 4B pairs, B images).
        ``draw`` (these rows' part of the negative draw): a row without a valid negative has its negative pair
        dropped from the ITM mean; ``itm_count`` replaces this call's pair count as the mean's denominator
        (a chunk of a larger batch); ``stats`` collects the ITM accuracies.
        """
        model = self.model
        texts: list[EncoderOutput] = []
        images: list[EncoderOutput] = []
        if negatives is not None:
            texts += [text_out, text_out, negatives[0]]
            images += [image_out, negatives[1], image_out]
        if masked_out is not None:
            texts.append(masked_out)
            images.append(image_out)
        if not texts:
            return {}
        # without MLM only the [CLS] states are read, so the last fusion layer computes just those rows
        pooled_only = masked_out is None
        if shared is not None and negatives is not None:
            image_all, neg_image, offset = shared
            local = torch.arange(offset, offset + image_out.tokens.shape[0], device=neg_image.device)
            index = torch.cat([local, neg_image, local] + ([local] if masked_out is not None else []))
            fused = model.fuse_indexed(EncoderOutput.cat(texts), image_all, index, pooled_only=pooled_only)
        else:
            fused = model.fuse(EncoderOutput.cat(texts), EncoderOutput.cat(images), pooled_only=pooled_only)
        rows = text_out.tokens.shape[0]
        terms: dict[str, Tensor] = {}
        if negatives is not None:
            pairs = FusionOutput(fused.text[:3 * rows], fused.image[:3 * rows], fused.pooled[:3 * rows])
            logits = model.itm_scores(pairs)
            labels_itm = itm_labels(rows, device=logits.device)
            weights = None if draw is None else itm_pair_weights(draw.has_image, draw.has_text)
            terms["itm"] = itm_loss(logits, labels_itm, weights, itm_count)
            if stats is not None:
                stats.add(logits.detach(), labels_itm, weights)
        if masked_out is not None and labels is not None:
            assert model.mlm_head is not None
            masked_states = fused.text[-rows:, :labels.shape[1]]  # the pairs may be padded to a longer text
            # the vocabulary projection only where there is a label: [B, T, V] logits are large for a BPE vocabulary
            selected = labels != IGNORE_INDEX
            terms["mlm"] = mlm_loss(model.mlm_head(masked_states[selected]).float(), labels[selected])
        return terms

    def _weighted(self, terms: dict[str, Tensor]) -> Tensor:
        cfg = self.config
        weights = {"itc": cfg.itc_weight, "itm": cfg.itm_weight, "mlm": cfg.mlm_weight, "distill": cfg.teacher_weight}
        total = torch.zeros((), device=next(iter(terms.values())).device)
        for key, value in terms.items():
            total = total + weights[key] * value
        return total

    def _mask(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        tok = self.model.tokenizer
        return mask_tokens(ids, mask, tok.mask_id, tok.special_ids, self.model.text_encoder.vocab_size,
                           probability=self.config.mlm_probability, generator=self.generator)


def _part(tensor: Tensor | None, rows: slice) -> Tensor | None:
    return None if tensor is None else tensor[rows]
