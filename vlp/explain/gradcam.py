"""Grad-CAM on the fusion's text->image attention (the ALBEF visualization).

For one fusion layer, the text->image attention weights A [b, h, t, i] are weighted by the gradient of
the ITM match logit with respect to them, keeping only positive gradients (relu(dS/dA) * A, as ALBEF's
notebook), averaged over heads. Each text token then has a map over the image tokens; the image [CLS]
token is dropped and the patches are laid out on their grid.

Dual-stream fusion gives ``"text_to_image"`` weights per layer; single-stream fusion gives the joint
self-attention over [text; image], whose text-query/image-key block is the text->image part.

Axis legend: b = batch, h = heads, t = text tokens, i = image tokens, y/x = patch grid rows/columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

from vlp.errors import UserError
from vlp.models.vlp_model import VLPModel

__all__ = ["Explanation", "explain", "text_to_image_gradcam", "caption_heatmap", "default_layer"]


@dataclass
class Explanation:
    """Where the caption ``text`` grounds in an image, on the model's patch grid [y, x] (non-negative maps).

    ``token_maps`` [t, y, x] has one map per text token (``tokens``, special tokens included);
    ``heatmap`` [y, x] is the whole caption: the mean of the maps of all real tokens, [CLS] included
    (in the last fusion layer only [CLS] reaches the match score, so its row carries the signal there).
    ``words`` / ``word_maps`` [w, y, x] merge the sub-word tokens of each word (mean of their maps).
    ``itm_score`` is the match probability softmax(ITM logits)[1]; ``layer`` the fusion layer used
    (non-negative index); ``image_size`` the side of the square the model saw (resize + center crop).
    """

    text: str
    heatmap: Tensor
    token_maps: Tensor
    tokens: list[str]
    words: list[str]
    word_maps: Tensor
    itm_score: float
    layer: int
    image_size: int


def _fusion_depth(model: VLPModel) -> int:
    fusion = model.fusion
    layers = getattr(fusion, "text_layers", None) or getattr(fusion, "blocks", None)
    if layers is None:
        raise UserError(f"explain supports vlp's single- and dual-stream fusion, not {type(fusion).__name__}")
    return len(layers)


def default_layer(model: VLPModel) -> int:
    """The second-to-last fusion layer (the last when there is one), as ALBEF picks an inner layer.

    In the last layer the ITM head reads only the [CLS] state, so the attention rows of the words get no
    gradient there; one layer earlier every token's attention still reaches the score.
    """
    return max(_fusion_depth(model) - 2, 0)


def _check_explainable(model: VLPModel) -> None:
    if model.fusion is None:
        raise UserError("explain needs a model with a fusion block; this is a dual encoder (fusion.type: none) "
                        "whose image and text never attend to each other")
    if model.itm_head is None:
        raise UserError("explain needs the ITM head (model.itm_head: true): the maps are weighted by the "
                        "gradient of the match score")


def _patch_grid(num_image_tokens: int) -> tuple[int, bool]:
    """(grid side, whether the first image token is a [CLS] to drop) from the image token count."""
    side = math.isqrt(num_image_tokens - 1) if num_image_tokens > 1 else 0
    if side * side == num_image_tokens - 1:
        return side, True
    side = math.isqrt(num_image_tokens)
    if side * side == num_image_tokens:
        return side, False
    raise UserError(f"cannot lay {num_image_tokens} image tokens on a square patch grid "
                    "(expected [CLS] + side^2 or side^2 tokens)")


def _resolve_layer(model: VLPModel, layer: int | None) -> int:
    depth = _fusion_depth(model)
    index = default_layer(model) if layer is None else layer
    if not -depth <= index < depth:
        raise UserError(f"--layer {index} is out of range: the fusion has {depth} layers")
    return index % depth


def text_to_image_gradcam(model: VLPModel, images: Tensor, input_ids: Tensor, attention_mask: Tensor,
                          layer: int | None = None) -> tuple[Tensor, Tensor]:
    """Grad-CAM maps [b, t, y, x] of each text token over the patch grid, and the ITM logits [b, 2].

    ``images`` are normalized [b, 3, H, W]; rows of the batch are independent (image b with text b).
    Padded text positions get zero maps. The model's parameters get no ``.grad``.
    """
    _check_explainable(model)
    index = _resolve_layer(model, layer)
    was_training = model.training
    model.eval()  # dropout would make the maps random
    try:
        with torch.enable_grad():
            # A leaf that requires grad makes a graph even when every parameter is frozen.
            pixels = images.detach().requires_grad_(True)
            image_out = model.image_encoder(pixels)
            text_out = model.text_encoder(input_ids, attention_mask.bool())
            fused = model.fuse(text_out, image_out, return_attention=True)
            logits = model.itm_scores(fused)
            if fused.attentions is None:
                raise UserError(f"{type(model.fusion).__name__} returned no attention weights")
            weights = fused.attentions[index]
            joint = "text_to_image" not in weights
            attention = weights["self"] if joint else weights["text_to_image"]
            # Rows are independent samples, so the gradient of the sum is each row's own gradient.
            (grad,) = torch.autograd.grad(logits[:, 1].sum(), attention)
    finally:
        model.train(was_training)
    attention, grad = attention.detach(), grad.detach()
    num_text = input_ids.shape[1]
    if joint:  # [text; image] queries x keys: keep text queries, image keys
        attention, grad = attention[:, :, :num_text, num_text:], grad[:, :, :num_text, num_text:]
    cam = (attention * grad.clamp(min=0)).mean(dim=1)  # b t i
    cam = cam * attention_mask.bool().to(cam.dtype)[:, :, None]
    side, has_cls = _patch_grid(cam.shape[-1])
    if has_cls:
        cam = cam[:, :, 1:]
    return rearrange(cam, "b t (y x) -> b t y x", y=side, x=side), logits.detach()


def caption_heatmap(maps: Tensor, attention_mask: Tensor) -> Tensor:
    """The whole caption's map [b, y, x]: the mean of the token maps [b, t, y, x] over real tokens.

    Special tokens count: the ITM head reads the [CLS] state, so in the last fusion layer only the [CLS]
    row has a gradient, and in earlier layers it sums up the caption as the word rows do.
    """
    real = attention_mask.bool().to(maps.dtype)
    return (maps * real[:, :, None, None]).sum(dim=1) / real.sum(dim=1).clamp(min=1)[:, None, None]


def _word_spans(model: VLPModel, text: str, input_ids: Tensor) -> tuple[list[str], list[tuple[str, list[int]]]]:
    """Each token's string, and each word of ``text`` with its token positions (special tokens belong to
    no word), from the tokenizer's word ids and character offsets."""
    encoding = model.tokenizer.backend.encode(text)  # the batch call above set the same truncation
    if list(encoding.ids) != input_ids.tolist():
        raise RuntimeError("the tokenizer's single and batch encodings of the text differ")
    positions: dict[int, list[int]] = {}
    for position, (word, special) in enumerate(zip(encoding.word_ids, encoding.special_tokens_mask)):
        if word is not None and not special:
            positions.setdefault(word, []).append(position)
    spans = [(text[encoding.offsets[p[0]][0]:encoding.offsets[p[-1]][1]], p) for p in positions.values()]
    return list(encoding.tokens), spans


def explain(model: VLPModel, image: Image.Image, text: str, layer: int | None = None) -> Explanation:
    """Grad-CAM maps of ``text`` over ``image`` (any size: resized and center-cropped as in evaluation).

    ``layer`` is a fusion layer index (negative counts from the end); None = ``default_layer(model)``.
    """
    _check_explainable(model)
    if not text.strip():
        raise UserError("explain needs a non-empty text")
    device = model.device()
    pixels = model.image_transform(train=False)(image.convert("RGB")).unsqueeze(0).to(device)
    batch = model.tokenizer([text], model.config.text.max_length)
    input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    maps, logits = text_to_image_gradcam(model, pixels, input_ids, mask, layer)
    token_maps = maps[0].float().cpu()  # t y x
    tokens, spans = _word_spans(model, text, input_ids[0].cpu())
    words = [word for word, _ in spans]
    word_maps = [token_maps[positions].mean(dim=0) for _, positions in spans]
    return Explanation(
        text=text,
        heatmap=caption_heatmap(token_maps[None], mask[:1].cpu())[0],
        token_maps=token_maps,
        tokens=tokens,
        words=words,
        word_maps=torch.stack(word_maps) if word_maps else token_maps.new_zeros(0, *token_maps.shape[1:]),
        itm_score=float(logits.softmax(dim=-1)[0, 1]),
        layer=_resolve_layer(model, layer),
        image_size=int(model.image_encoder.image_size),
    )
