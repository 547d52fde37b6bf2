"""open_clip image and text towers as vlp encoders, giving exactly open_clip's own embeddings.

Configuration (``image.options`` / ``text.options``):

- ``embed_dim`` (int): the CLIP embedding width, i.e. the tower's projection output (default: the
  preset's, or the tower width when ``name`` is empty); ``quick_gelu`` (bool, default: the preset's, else False).
- any other key is a field of open_clip's ``CLIPVisionCfg`` (image) or ``CLIPTextCfg`` (text) and
  overrides the tower config, e.g. ``{layers: 1, width: 64, head_width: 32}``.

With ``name`` (a built-in open_clip model name such as ``ViT-B-16``) the preset defines the tower
(``image_size`` still sets the input resolution); without it the tower is built from the vlp fields:
image ``image_size, patch_size, width, depth -> layers, num_heads -> head_width = width / num_heads,
mlp_ratio``; text ``max_length -> context_length, vocab_size (0 = tokenizer's), width, num_heads -> heads,
depth -> layers, mlp_ratio``, pad id = the tokenizer's, pooled at the token that closes every sequence
(``argmax`` for CLIP's BPE, where EOT is the largest id; else ``eos`` with the tokenizer's SEP/EOT id).
``dropout``, ``causal`` and ``pooling`` of the vlp text config are not used: open_clip's ``no_causal_mask``
and ``pool_type`` decide.

Weights come only from ``weights``, a local open_clip checkpoint of a whole CLIP model; each tower keeps
its own tensors (``visual.*`` / the text tower's) and must match them exactly. ``hf-hub:`` names,
pretrained tags and Hugging Face text towers would download and are refused; CoCa towers are not supported.

Image tokens = [class token; patch tokens] after ``ln_post`` (timm and ResNet towers: the backbone feature
map, flattened); pooled = ``encode_image``. Text tokens = per-token states after ``ln_final``; pooled =
``encode_text`` (EOT state, projected). vlp pads a batch to its longest caption: causal towers slice
their mask to that length (positions after EOT cannot change it); towers whose pooling or attention sees
padding (``pool_type: last``, bidirectional without a pad mask, as SigLIP) are fed the full context.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.config.schema import ImageEncoderConfig, TextEncoderConfig
from vlp.data.tokenizers import Tokenizer
from vlp.encoders.base import ImageEncoder, TextEncoder
from vlp.encoders.open_clip_rows import (
    image_pooled_row,
    image_row_supported,
    text_pooled_row,
    text_row_supported,
)
from vlp.encoders.timm_encoder import feature_tokens, load_weights, read_weights
from vlp.errors import ConfigError, UserError, one_line
from vlp.registry import image_encoders, text_encoders
from vlp.types import EncoderOutput

__all__ = ["OpenClipImageEncoder", "OpenClipTextEncoder", "build_open_clip_image", "build_open_clip_text"]

TOP_LEVEL_OPTIONS = ("embed_dim", "quick_gelu")
# Stand-ins for the tower a builder discards: open_clip only builds whole CLIP models.
SPARE_VISION = {"image_size": 8, "patch_size": 8, "width": 8, "layers": 1, "head_width": 8}
SPARE_TEXT = {"context_length": 2, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1}
# Top-level text-tower modules of open_clip's CLIP class; CustomTextCLIP nests them under ``text.``.
FLAT_TEXT_MODULES = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


def _preset(name: str, section: str) -> dict[str, Any]:
    import open_clip

    if name.startswith(("hf-hub:", "local-dir:")):
        raise UserError(f"{section}.name '{name}': use a built-in open_clip model name and a local checkpoint in "
                        f"{section}.weights (vlp never downloads)")
    preset = open_clip.get_model_config(name.replace("/", "-"))
    if preset is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{section}.name '{name}' is not an open_clip model{hint}")
    if "multimodal_cfg" in preset:
        raise ConfigError(f"{section}.name '{name}' is a CoCa model, which vlp's open_clip encoders do not support")
    return dict(preset)


def _split_options(options: dict[str, Any], tower_cfg: type, section: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(top-level CLIP kwargs, tower-config overrides); unknown keys are a ConfigError naming the closest field."""
    known = [f.name for f in dataclasses.fields(tower_cfg)]
    for key in options:
        if key not in known and key not in TOP_LEVEL_OPTIONS:
            close = difflib.get_close_matches(key, known + list(TOP_LEVEL_OPTIONS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{section}.options.{key} is not an open_clip {tower_cfg.__name__} field{hint}")
    top = {k: v for k, v in options.items() if k in TOP_LEVEL_OPTIONS}
    return top, {k: v for k, v in options.items() if k not in TOP_LEVEL_OPTIONS}


def _clip(top: dict[str, Any], vision: dict[str, Any], text: dict[str, Any], section: str) -> Any:
    from open_clip import CustomTextCLIP

    if text.get("hf_model_name"):
        raise ConfigError(f"{section}: open_clip text towers built on Hugging Face models are not supported; "
                          "use text.type 'hf' with a local model directory")
    if text.get("embed_cls"):
        raise ConfigError(f"{section}: open_clip text towers with an appended class token (CoCa) are not supported")
    if vision.get("timm_model_pretrained"):
        raise ConfigError(f"{section}: timm_model_pretrained would download weights; use {section}.weights")
    try:
        # CustomTextCLIP keeps the text tower in one submodule; CLIP builds the same tower, flattened.
        return CustomTextCLIP(embed_dim=top["embed_dim"], vision_cfg=vision, text_cfg=text,
                              quick_gelu=bool(top.get("quick_gelu", False)))
    except (TypeError, ValueError, AssertionError) as error:
        raise ConfigError(f"{section}.options do not build an open_clip tower: {one_line(error)}") from error


def _read_checkpoint(path: str, name: str, section: str) -> dict[str, Tensor] | None:
    """A whole-CLIP checkpoint's tensors, read before building so a bad path fails fast; None without weights."""
    import open_clip

    if not path:
        return None
    if name and path in open_clip.list_pretrained_tags_by_model(name.replace("/", "-")):
        raise UserError(f"{section}.weights '{path}' is an open_clip pretrained tag, which would download; "
                        "save the checkpoint to a local file and give its path")
    return read_weights(path)


def _nested_text_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """CLIP's flat text keys -> ``text.*`` (open_clip's converter misses a Linear ``text_projection``)."""
    return {f"text.{k}" if k.split(".")[0] in FLAT_TEXT_MODULES else k: v for k, v in state.items()}


def _load_tower(encoder: nn.Module, state: dict[str, Tensor], path: str, prefix: str, convert: Any) -> None:
    """Convert a whole-CLIP state dict, keep the tower's tensors (keys starting with ``prefix``), load strictly."""
    try:
        state = convert(dict(state))
    except (RuntimeError, ValueError, AssertionError) as error:
        raise UserError(f"cannot convert weights {path}: {one_line(error)}") from error
    load_weights(encoder, {k: v for k, v in state.items() if k.startswith(prefix)}, path)


def _largest_text_id(tokenizer: Tokenizer) -> int:
    largest = tokenizer.vocab_size - 1
    return largest - 1 if tokenizer.mask_id == largest else largest  # an appended mask never reaches the tower


def _end_token_pooling(tokenizer: Tokenizer) -> dict[str, Any]:
    """Pool at the token that closes every sequence (EOT/SEP): open_clip's ``argmax`` finds it only when it is
    the largest id (CLIP's BPE), otherwise ``eos`` with its id."""
    end_id = int(tokenizer([""], max_length=8)["input_ids"][0, -1])
    if end_id == _largest_text_id(tokenizer):
        return {"pool_type": "argmax"}
    return {"pool_type": "eos", "eos_id": end_id}


class OpenClipImageEncoder(ImageEncoder):
    """An open_clip visual tower (VisionTransformer, TimmModel or ModifiedResNet) kept as ``self.visual``."""

    visual: Any  # open_clip modules are untyped
    computes_pooled_only = True  # ViT towers pooling the class token (vlp.encoders.open_clip_rows)

    def __init__(self, visual: Any, embed_dim: int, image_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        super().__init__()
        self.visual = visual
        self.embed_dim = embed_dim
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        tower = self.visual
        if isinstance(tower, VisionTransformer):
            self.kind = "vit"
            self.width = int(tower.output_dim if tower.attn_pool is not None else tower.transformer.width)
        elif isinstance(tower, TimmModel):
            self.kind = "timm"
            self.width = int(tower.trunk.num_features)
        elif isinstance(tower, ModifiedResNet):
            self.kind = "resnet"
            self.width = int(tower.attnpool.k_proj.in_features)
        else:
            raise TypeError(f"unsupported open_clip visual tower {type(visual).__name__}")

    def forward(self, images: Tensor, pooled_only: bool = False) -> EncoderOutput:
        """``pooled_only`` (ViT towers pooling the class token): the last block computes only that row (a dual
        encoder's ITC reads nothing else); ``tokens`` then hold it [b, 1, width]."""
        visual = self.visual
        if pooled_only and image_row_supported(visual):
            tokens = image_pooled_row(visual, images)
            pooled = tokens[:, 0] if visual.proj is None else tokens[:, 0] @ visual.proj
            return EncoderOutput(tokens, tokens.new_ones(tokens.shape[:2], dtype=torch.bool), pooled)
        if self.kind == "vit":
            x = visual.transformer(visual._embeds(images))
            if visual.attn_pool is None and not visual.final_ln_after_pool:
                tokens = visual.ln_post(x)
                pooled, _ = visual._global_pool(tokens)
            else:  # open_clip normalizes only the pooled vector, or pools by attention
                pooled, pooled_tokens = visual._pool(x)
                tokens = pooled_tokens if visual.attn_pool is not None else x
            if visual.proj is not None:
                pooled = pooled @ visual.proj
        elif self.kind == "timm":
            features = visual.trunk.forward_features(images)
            pooled = visual.head(visual.trunk.forward_head(features))
            tokens = feature_tokens(features, str(getattr(visual.trunk, "output_fmt", "")).endswith("NHWC"))
        else:
            x = visual.stem(images)
            x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
            pooled, tokens = visual.attnpool(x), feature_tokens(x)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(tokens=tokens, mask=mask, pooled=pooled)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """open_clip's own switch (a no-op for ModifiedResNet towers, as in open_clip)."""
        self.visual.set_grad_checkpointing(enable)


class OpenClipTextEncoder(TextEncoder):
    """An open_clip ``TextTransformer`` kept as ``self.text`` (state-dict keys ``text.*`` as in CustomTextCLIP)."""

    text: Any  # open_clip modules are untyped
    computes_pooled_only = True  # causal towers pooling at one token (vlp.encoders.open_clip_rows)

    def __init__(self, text: Any) -> None:
        super().__init__()
        self.text = text
        self.width = int(text.width)
        self.embed_dim = int(text.output_dim) if text.text_projection is not None else self.width
        self.vocab_size = int(text.vocab_size)
        self.bidirectional = text.attn_mask is None
        # These towers see the padding (open_clip's configs give bidirectional towers no pad mask, and "last"
        # pools the final position), so they get the full context length of padding, as open_clip feeds them.
        self.full_context = text.pool_type == "last" or self.bidirectional

    @property
    def embeddings(self) -> nn.Embedding:
        """The token embedding (an MLM head ties its decoder weight to it)."""
        embedding: nn.Embedding = self.text.token_embedding
        return embedding

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pooled_only: bool = False) -> EncoderOutput:
        """``pooled_only`` (causal towers pooling at a token, as CLIP's): only what ``pooled`` depends on is
        computed — no columns after the last pooled position, and only the pooled row in the last block;
        ``tokens`` and ``mask`` then hold that row [b, 1, ...]."""
        from open_clip.transformer import text_global_pool

        text = self.text
        mask = attention_mask.bool()
        length = input_ids.shape[1]
        if length > text.context_length:
            raise ValueError(f"{length} tokens exceed the open_clip context length {text.context_length}")
        if pooled_only and text_row_supported(text):
            tokens = text_pooled_row(text, input_ids)
            pooled = self._project(tokens[:, 0])
            return EncoderOutput(tokens, tokens.new_ones(tokens.shape[:2], dtype=torch.bool), pooled)
        ids = input_ids
        if self.full_context and length < text.context_length:
            ids = F.pad(input_ids, (0, text.context_length - length), value=text.pad_id)
        steps = ids.shape[1]
        cast_dtype = text.transformer.get_cast_dtype()
        x = text.token_embedding(ids).to(cast_dtype) + text.positional_embedding[:steps].to(cast_dtype)
        # causal towers: the mask sliced to this length (positions after EOT cannot reach it)
        causal = None if text.attn_mask is None else text.attn_mask[:steps, :steps].to(x.dtype)
        x = text.ln_final(text.transformer(x, attn_mask=causal))
        pooled = text_global_pool(x, ids, text.pool_type, eos_token_id=text.eos_id)
        return EncoderOutput(tokens=x[:, :length], mask=mask, pooled=self._project(pooled))

    def _project(self, pooled: Tensor) -> Tensor:
        """The tower's text projection (a Linear or a matrix), if any."""
        projection = self.text.text_projection
        if isinstance(projection, nn.Linear):
            return projection(pooled)  # type: ignore[no-any-return]
        return pooled if projection is None else pooled @ projection

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text.set_grad_checkpointing(enable)


@image_encoders.register("open_clip")
def build_open_clip_image(cfg: ImageEncoderConfig) -> OpenClipImageEncoder:
    from open_clip import CLIPVisionCfg
    from open_clip.model import resize_pos_embed

    top, overrides = _split_options(dict(cfg.options), CLIPVisionCfg, "image")
    checkpoint = _read_checkpoint(cfg.weights, cfg.name, "image")
    if cfg.name:
        preset = _preset(cfg.name, "image")
        vision = {**preset["vision_cfg"], "image_size": cfg.image_size, **overrides}
        top = {"embed_dim": preset["embed_dim"], "quick_gelu": preset.get("quick_gelu", False), **top}
    else:
        if cfg.width % cfg.num_heads != 0:
            raise ConfigError(f"image.width {cfg.width} is not divisible by image.num_heads {cfg.num_heads}")
        vision = {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "width": cfg.width,
                  "layers": cfg.depth, "head_width": cfg.width // cfg.num_heads, "mlp_ratio": cfg.mlp_ratio,
                  **overrides}
        top = {"embed_dim": vision["width"], **top}
    if vision.get("pool_type") == "none":
        raise ConfigError("image.options.pool_type 'none' gives no pooled embedding")
    model = _clip(top, vision, SPARE_TEXT, "image")
    encoder = OpenClipImageEncoder(model.visual, int(top["embed_dim"]), cfg.image_size, cfg.mean, cfg.std)
    if checkpoint is not None:

        def convert(state: dict[str, Tensor]) -> dict[str, Tensor]:
            resize_pos_embed(state, encoder)  # checkpoint grid -> image_size grid
            return state

        _load_tower(encoder, checkpoint, cfg.weights, "visual.", convert)
    return encoder


@text_encoders.register("open_clip")
def build_open_clip_text(cfg: TextEncoderConfig, tokenizer: Tokenizer) -> OpenClipTextEncoder:
    from open_clip import CLIPTextCfg
    from open_clip.model import resize_text_pos_embed

    top, overrides = _split_options(dict(cfg.options), CLIPTextCfg, "text")
    checkpoint = _read_checkpoint(cfg.weights, cfg.name, "text")
    if cfg.name:
        preset = _preset(cfg.name, "text")
        text_cfg = {**preset["text_cfg"], **overrides}
        top = {"embed_dim": preset["embed_dim"], "quick_gelu": preset.get("quick_gelu", False), **top}
    else:
        text_cfg = {"context_length": cfg.max_length, "vocab_size": cfg.vocab_size or tokenizer.vocab_size,
                    "width": cfg.width, "heads": cfg.num_heads, "layers": cfg.depth, "mlp_ratio": cfg.mlp_ratio,
                    "pad_id": tokenizer.pad_id, **_end_token_pooling(tokenizer), **overrides}
        top = {"embed_dim": text_cfg["width"], **top}
    model = _clip(top, SPARE_VISION, text_cfg, "text")
    encoder = OpenClipTextEncoder(model.text)
    if cfg.max_length > model.text.context_length:
        raise ConfigError(f"text.max_length {cfg.max_length} exceeds the open_clip context length "
                          f"{model.text.context_length}")
    largest_id = _largest_text_id(tokenizer)
    if largest_id >= encoder.vocab_size:
        raise ConfigError(f"tokenizer ids reach {largest_id} but the open_clip text tower has "
                          f"{encoder.vocab_size} embeddings; set text.tokenizer to the model's tokenizer")
    if checkpoint is not None:

        def convert(state: dict[str, Tensor]) -> dict[str, Tensor]:
            state = _nested_text_keys(state)
            resize_text_pos_embed(state, encoder)
            return state

        _load_tower(encoder, checkpoint, cfg.weights, "text.", convert)
    return encoder
