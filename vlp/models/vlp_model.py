"""VLPModel: receives built encoders, fusion and heads; embeds, fuses and scores image-text pairs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.encoders.base import ImageEncoder, TextEncoder
from vlp.fusion.base import computes_pooled_only, shares_image_context
from vlp.layers.logit_scale import LogitScale
from vlp.models.heads import ITMHead, MLMHead
from vlp.types import EncoderOutput, FusionOutput

__all__ = ["VLPModel", "VLPOutput", "ImageContext", "image_features_of", "text_features_of"]


@dataclass
class VLPOutput:
    """``VLPModel.forward``'s result; the field names are those of Hugging Face's ``CLIPOutput``.

    image_embeds [B_i, E], text_embeds [B_t, E]: L2-normalized fp32 contrastive embeddings (None when that
    input was not given). logits_per_image [B_i, B_t] = logit_scale * image_embeds @ text_embeds.T
    (+ logit_bias for SigLIP) and logits_per_text = its transpose, as open_clip and transformers compute
    them; None unless both inputs were given. itm_logits [B, 2] (column 1 = match): the ITM head on the
    aligned rows (image b with text b) of a fused model when both batches have B rows, else None.
    """

    image_embeds: Tensor | None = None
    text_embeds: Tensor | None = None
    logits_per_image: Tensor | None = None
    logits_per_text: Tensor | None = None
    itm_logits: Tensor | None = None


@dataclass
class ImageContext:
    """Fusion-ready image tokens of a gallery, computed once and indexed per candidate pair.

    ``kv`` holds each fusion layer's cross-attention keys/values when the fusion can reuse them
    (one-way dual stream), so re-ranking never recomputes the image side.
    """

    tokens: Tensor
    mask: Tensor
    kv: list[tuple[Tensor, Tensor]] | None = None

    def select(self, index: Tensor) -> ImageContext:
        kv = None if self.kv is None else [(k[index], v[index]) for k, v in self.kv]
        return ImageContext(self.tokens[index], self.mask[index], kv)


def image_features_of(model: Any, images: Tensor, pooled_only: bool = False) -> tuple[EncoderOutput, Tensor]:
    """``model.image_features(images)`` of a ``VLPModel`` or any model with that method; ``pooled_only``
    (only the embedding is read) reaches a ``VLPModel``, which declares it; other models need not take it."""
    if pooled_only and isinstance(model, VLPModel):
        return model.image_features(images, pooled_only=True)
    features: tuple[EncoderOutput, Tensor] = model.image_features(images)
    return features


def text_features_of(model: Any, input_ids: Tensor, attention_mask: Tensor,
                     pooled_only: bool = False) -> tuple[EncoderOutput, Tensor]:
    """As ``image_features_of`` for ``model.text_features(input_ids, attention_mask)``."""
    if pooled_only and isinstance(model, VLPModel):
        return model.text_features(input_ids, attention_mask, pooled_only=True)
    features: tuple[EncoderOutput, Tensor] = model.text_features(input_ids, attention_mask)
    return features


class VLPModel(nn.Module):
    """A vision-language model assembled from built parts (only factories read configs)."""

    def __init__(
        self,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        fusion: nn.Module | None,
        temperature: LogitScale,
        embed_dim: int = 256,
        itm_head: bool = True,
        mlm_head: bool = False,
        tokenizer: Any = None,
        config: Any = None,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.fusion = fusion
        self.temperature = temperature
        self.tokenizer = tokenizer
        self.config = config
        self.image_proj: nn.Module = nn.Linear(image_encoder.embed_dim, embed_dim) if embed_dim else nn.Identity()
        self.text_proj: nn.Module = nn.Linear(text_encoder.embed_dim, embed_dim) if embed_dim else nn.Identity()
        fusion_dim = text_encoder.width
        # a fusion may read image tokens at their own width (BLIP's cross-attention: ``image_dim``)
        fusion_image_dim = int(getattr(fusion, "image_dim", fusion_dim))
        self.image_to_fusion: nn.Module = (
            nn.Linear(image_encoder.width, fusion_image_dim)
            if fusion is not None and image_encoder.width != fusion_image_dim else nn.Identity()
        )
        out_dim = int(getattr(fusion, "out_dim", 0))
        self.itm_head = ITMHead(out_dim) if fusion is not None and itm_head else None
        embedding = getattr(text_encoder, "embeddings", None)
        self.mlm_head = (
            MLMHead(fusion_dim, text_encoder.vocab_size, embedding if isinstance(embedding, nn.Embedding) else None)
            if fusion is not None and mlm_head else None
        )

    @property
    def has_fusion(self) -> bool:
        return self.fusion is not None

    # embeddings -----------------------------------------------------------------------------
    def image_features(self, images: Tensor, pooled_only: bool = False) -> tuple[EncoderOutput, Tensor]:
        """The encoder output (for fusion) and the L2-normalized fp32 contrastive embedding.

        ``pooled_only``: the caller needs only the embedding (no fusion), so an encoder that declares
        ``computes_pooled_only`` computes just the pooled row in its last block (its ``tokens`` are then partial)."""
        out = self.image_encoder.encode(images, pooled_only=pooled_only)
        return out, F.normalize(self.image_proj(out.pooled).float(), dim=-1)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor,
                      pooled_only: bool = False) -> tuple[EncoderOutput, Tensor]:
        """As ``image_features`` for text."""
        out = self.text_encoder.encode(input_ids, attention_mask.bool(), pooled_only=pooled_only)
        return out, F.normalize(self.text_proj(out.pooled).float(), dim=-1)

    def encode_image(self, images: Tensor) -> Tensor:
        return self.image_features(images)[1]

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.text_features(input_ids, attention_mask)[1]

    def logit_scale(self) -> Tensor:
        """exp of the learned log scale (1/temperature), fp32."""
        return self.temperature.logit_scale()

    def logit_bias(self) -> Tensor | None:
        """SigLIP's learned bias added to every scaled similarity (fp32); None for the softmax ITC, which has none."""
        return self.temperature.logit_bias()

    @property
    def contrastive(self) -> str:
        """The ``vlp.registry.losses`` name of this model's contrastive loss: siglip when it owns a bias."""
        return "itc" if self.temperature.bias is None else "siglip"

    def forward(self, pixel_values: Tensor | None = None, input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None) -> VLPOutput:
        """Embeddings and similarity logits with Hugging Face's argument and field names (no loss is computed).

        ``attention_mask`` defaults to every token being real (as in transformers); pass the tokenizer's mask
        for padded batches. See ``VLPOutput`` for what is filled.
        """
        if pixel_values is None and input_ids is None:
            raise ValueError("VLPModel.forward needs pixel_values, input_ids or both")
        out = VLPOutput()
        image_out = text_out = None
        if pixel_values is not None:
            image_out, out.image_embeds = self.image_features(pixel_values)
        if input_ids is not None:
            mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask
            text_out, out.text_embeds = self.text_features(input_ids, mask)
        if out.image_embeds is None or out.text_embeds is None or image_out is None or text_out is None:
            return out
        logits = self.logit_scale() * out.image_embeds @ out.text_embeds.T
        bias = self.logit_bias()
        out.logits_per_image = logits if bias is None else logits + bias
        out.logits_per_text = out.logits_per_image.T
        if self.fusion is not None and self.itm_head is not None and len(out.image_embeds) == len(out.text_embeds):
            out.itm_logits = self.itm_scores(self.fuse(text_out, image_out, pooled_only=True))
        return out

    # fusion -----------------------------------------------------------------------------------
    def _require_fusion(self) -> nn.Module:
        if self.fusion is None:
            from vlp.errors import UserError

            raise UserError("this model has no fusion block (fusion.type: none): ITM/VQA need a fused model")
        return self.fusion

    def fuse(self, text_out: EncoderOutput, image_out: EncoderOutput, return_attention: bool = False,
             pooled_only: bool = False) -> FusionOutput:
        """Fuse aligned rows. ``pooled_only``: only ``pooled`` is needed (ITM), so a fusion block that declares
        ``computes_pooled_only`` computes just the [CLS] rows in its last layer; its ``text``/``image`` are then
        partial."""
        image_tokens = self.image_to_fusion(image_out.tokens)
        return self._fusion(text_out.tokens, image_tokens, text_out.mask, image_out.mask, pooled_only,
                            return_attention=return_attention)

    def fuse_indexed(self, text_out: EncoderOutput, image_out: EncoderOutput, index: Tensor,
                     pooled_only: bool = False) -> FusionOutput:
        """Fuse text row b with image row ``index[b]`` of ``image_out`` (e.g. ITM positives and negatives that
        reuse a batch's images). A fusion that declares ``shares_image_context()`` (one-way) projects each
        distinct image's cross-attention keys/values once and shares them across its rows; other blocks get
        the selected rows."""
        if not shares_image_context(self._require_fusion()):
            return self.fuse(text_out, image_out.select(index), pooled_only=pooled_only)
        used, inverse = torch.unique(index, return_inverse=True)
        tokens = self.image_to_fusion(image_out.tokens[used])
        fused = self._fusion(text_out.tokens, tokens, text_out.mask, image_out.mask[used], pooled_only,
                             image_index=inverse)
        # one-way fusion returns the image tokens unchanged: each row's own
        return FusionOutput(fused.text, tokens[inverse], fused.pooled, fused.attentions)

    def _fusion(self, text: Tensor, image: Tensor, text_mask: Tensor, image_mask: Tensor, pooled_only: bool,
                **options: Any) -> FusionOutput:
        """The fusion block's forward; ``pooled_only`` reaches it only when it declares it."""
        fusion = self._require_fusion()
        if pooled_only and computes_pooled_only(fusion):
            options["pooled_only"] = True
        result: FusionOutput = fusion(text, image, text_mask, image_mask, **options)
        return result

    def itm_scores(self, fused: FusionOutput) -> Tensor:
        if self.itm_head is None:
            from vlp.errors import UserError

            raise UserError("this model has no ITM head (model.itm_head: false)")
        return self.itm_head(fused.pooled).float()  # type: ignore[no-any-return]

    def itm_logits(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, 2] match logits of aligned (image, text) rows; column 1 = match."""
        image_out = self.image_encoder(images)
        text_out = self.text_encoder(input_ids, attention_mask.bool())
        return self.itm_scores(self.fuse(text_out, image_out, pooled_only=True))

    def image_context(self, image_out: EncoderOutput) -> ImageContext:
        fusion = self._require_fusion()
        tokens = self.image_to_fusion(image_out.tokens)
        kv = fusion.image_kv(tokens) if shares_image_context(fusion) else None
        return ImageContext(tokens, image_out.mask, kv)

    def itm_logits_from(self, text_out: EncoderOutput, context: ImageContext, index: Tensor) -> Tensor:
        """Match logits pairing text row b with gallery image ``index[b]`` of a precomputed context."""
        if context.kv is None:
            picked = context.select(index)
            fused = self._fusion(text_out.tokens, picked.tokens, text_out.mask, picked.mask, True)
        else:
            # The cached keys/values stay shared: each row reads its image's by index (no per-pair copy of
            # [pairs, heads, image tokens, head dim]).
            fused = self._fusion(text_out.tokens, context.tokens, text_out.mask, context.mask, True,
                                 image_kv=context.kv, image_index=index)
        return self.itm_scores(fused)

    # construction / persistence ---------------------------------------------------------------
    def image_transform(self, train: bool = False) -> Any:
        from vlp.data.transforms import eval_transform, train_transform

        enc = self.image_encoder
        if train:
            return train_transform(enc.image_size, enc.mean, enc.std)
        return eval_transform(enc.image_size, enc.mean, enc.std)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.image_encoder.set_grad_checkpointing(enable)
        self.text_encoder.set_grad_checkpointing(enable)
        setter = getattr(self.fusion, "set_grad_checkpointing", None)
        if callable(setter):
            setter(enable)

    @classmethod
    def from_config(cls, source: str | Path | dict[str, Any] | Any) -> VLPModel:
        from vlp.models.factory import build_model, model_config_from

        return build_model(model_config_from(source))

    @classmethod
    def from_pretrained(cls, directory: str | Path, image_size: int = 0) -> VLPModel:
        """``image_size`` > 0: load at that resolution, interpolating the position embeddings."""
        from vlp.models.persist import load_pretrained

        return load_pretrained(directory, image_size=image_size)

    def save_pretrained(self, directory: str | Path, extra_config: dict[str, Any] | None = None) -> None:
        from vlp.models.persist import save_pretrained

        save_pretrained(self, directory, extra_config)

    def device(self) -> torch.device:
        return next(self.parameters()).device
