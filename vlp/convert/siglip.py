"""Hugging Face ``SiglipModel`` -> vlp: a timm SigLIP ViT (image) + an open_clip text tower, no fusion.

Image: timm's ``VisionTransformer`` as timm builds SigLIP (no class token, ``global_pool='map'``: the
attention-pool head with one latent query, LayerNorm and MLP), built with ``pretrained=False`` and the
source's sizes; HF's pooling head ``probe``/``attention.in_proj``/``out_proj``/``layernorm``/``mlp`` map to
timm's ``latent``/``q`` + ``kv`` (rows split)/``proj``/``norm``/``mlp``, HF's q/k/v concatenate into
timm's fused ``qkv``. Text: open_clip's ``TextTransformer`` with bidirectional attention, no pad mask,
``pool_type: last`` (the last position of the full context, which SigLIP pads to its max length) and a
Linear projection with bias (HF's ``head``). Activations are GELU (tanh approximation), LayerNorm eps from
the config. ``logit_scale``/``logit_bias`` become the SigLIP temperature and bias.

Tokenizer: SigLIP's is a sentencepiece model, and vlp builds tokenizers only from Rust ``tokenizers`` files
(no ``sentencepiece`` dependency): the source needs a ``tokenizer.json`` (the ``timm/ViT-*-SigLIP*``
repositories ship one) or ``--tokenizer``. Its pad id is set to the model's ``pad_token_id``, with which
SigLIP pads every caption to its full length, and it is saved with ``text_cleaning: canonicalize``: captions
go through ``open_clip.tokenizer.canonicalize_text`` before tokenizing, as in open_clip's SigLIP configs
(``clean: canonicalize``) and SigLIP's training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlp.convert.clip import hf_blocks_to_open_clip
from vlp.convert.common import (
    SIGLIP_CLEANING_NOTE,
    Plan,
    StateMapper,
    canonicalizing,
    clip_layers,
    hf_preprocessing,
    mlp_ratio,
    read_hf_directory,
    temperature_fields,
)
from vlp.data.tokenizers import Tokenizer, load_tokenizer
from vlp.errors import UserError
from vlp.models.factory import model_config_from

__all__ = ["siglip_plan", "fill_siglip"]

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
TIMM_NAME = "vit_base_patch16_siglip_224"  # every architecture argument is set in options
TIMM_LAYER_NORM_EPS = 1e-6  # timm's LayerNorm; not settable from a config file
TIMM_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}


def fill_siglip(mapper: StateMapper, vision_layers: int, text_layers: int, width: int) -> None:
    vision, trunk = "vision_model.", "image_encoder.model."
    mapper.copy_linear(f"{vision}embeddings.patch_embedding", f"{trunk}patch_embed.proj")
    mapper.copy(f"{vision}embeddings.position_embedding.weight", f"{trunk}pos_embed", lambda t: t.unsqueeze(0))
    clip_layers(mapper, f"{vision}encoder.layers", f"{trunk}blocks", vision_layers, "timm")
    mapper.copy_linear(f"{vision}post_layernorm", f"{trunk}norm")
    head, pool = f"{vision}head.", f"{trunk}attn_pool."
    mapper.copy(f"{head}probe", f"{pool}latent")
    for kind in ("weight", "bias"):
        mapper.split(f"{head}attention.in_proj_{kind}", [f"{pool}q.{kind}", f"{pool}kv.{kind}"], [width, 2 * width])
    mapper.copy_linear(f"{head}attention.out_proj", f"{pool}proj")
    mapper.copy_linear(f"{head}layernorm", f"{pool}norm")
    mapper.copy_linear(f"{head}mlp.fc1", f"{pool}mlp.fc1")
    mapper.copy_linear(f"{head}mlp.fc2", f"{pool}mlp.fc2")
    text, tower = "text_model.", "text_encoder.text."
    mapper.copy(f"{text}embeddings.token_embedding.weight", f"{tower}token_embedding.weight")
    mapper.copy(f"{text}embeddings.position_embedding.weight", f"{tower}positional_embedding")
    hf_blocks_to_open_clip(mapper, f"{text}encoder.layers", f"{tower}transformer.resblocks", text_layers)
    mapper.copy_linear(f"{text}final_layer_norm", f"{tower}ln_final")
    mapper.copy_linear(f"{text}head", f"{tower}text_projection")
    mapper.copy("logit_scale", "temperature.log_scale", lambda t: t.reshape(()))
    mapper.copy("logit_bias", "temperature.bias", lambda t: t.reshape(()))


def _tokenizer(src: Path, tokenizer: str | None, pad_id: int, notes: list[str]) -> tuple[Tokenizer, str]:
    if tokenizer:
        location = tokenizer
    elif (src / "tokenizer.json").is_file():
        location = str(src / "tokenizer.json")
    else:
        raise UserError(f"{src} has no tokenizer.json: SigLIP's sentencepiece tokenizer cannot be read without the "
                        "sentencepiece package; pass --tokenizer with a tokenizer.json (e.g. from the "
                        "timm/ViT-B-16-SigLIP repository)")
    tok = load_tokenizer(location)
    if tok.backend.id_to_token(pad_id) is None:
        raise UserError(f"the model's pad_token_id {pad_id} is not in the tokenizer {location}")
    if tok.pad_id != pad_id:
        notes.append(f"tokenizer pad id {tok.pad_id} -> the model's pad_token_id {pad_id} (SigLIP pads with it)")
    notes.append(SIGLIP_CLEANING_NOTE)
    return canonicalizing(tok, pad_id), location


def _text_options(text: Any, embed_dim: int, act: str) -> dict[str, Any]:
    return {"embed_dim": embed_dim, "quick_gelu": False, "context_length": int(text.max_position_embeddings),
            "vocab_size": int(text.vocab_size), "width": int(text.hidden_size), "heads": int(text.num_attention_heads),
            "layers": int(text.num_hidden_layers), "mlp_ratio": mlp_ratio(text.hidden_size, text.intermediate_size),
            "pad_id": int(text.pad_token_id), "pool_type": "last", "no_causal_mask": True, "proj_type": "linear",
            "proj_bias": True, "norm_kwargs": {"eps": float(text.layer_norm_eps)},
            **({"act_kwargs": {"approximate": "tanh"}} if act == "gelu_tanh" else {})}


def siglip_plan(src: Path, tokenizer: str | None) -> Plan:
    from transformers import SiglipConfig

    config, tensors = read_hf_directory(src, SiglipConfig, ("siglip",), "a SigLIP model (SiglipModel)")
    where = str(src / "config.json")
    vision, text = config.vision_config, config.text_config
    for name, act in (("vision", vision.hidden_act), ("text", text.hidden_act)):
        if act not in TIMM_ACTIVATIONS:
            raise UserError(f"{where}: {name} hidden_act '{act}' is not one of {', '.join(TIMM_ACTIVATIONS)}")
    if vision.layer_norm_eps != TIMM_LAYER_NORM_EPS:
        raise UserError(f"{where}: vision layer_norm_eps {vision.layer_norm_eps}: timm's SigLIP tower uses 1e-6")
    if not getattr(vision, "vision_use_head", True):
        raise UserError(f"{where}: vision_use_head false: vlp's SigLIP image embedding is the attention-pool head")
    if getattr(vision, "num_channels", 3) != 3:
        raise UserError(f"{where}: vlp images have 3 channels")
    notes: list[str] = []
    tok, tok_field = _tokenizer(src, tokenizer, int(text.pad_token_id), notes)
    size, patch, width = int(vision.image_size), int(vision.patch_size), int(vision.hidden_size)
    mean, std = hf_preprocessing(src, size, SIGLIP_MEAN, SIGLIP_STD, notes)
    embed_dim = int(getattr(text, "projection_size", None) or text.hidden_size)
    scale, bias = (float(tensors[k].float().reshape(-1)[0]) if k in tensors else 0.0
                   for k in ("logit_scale", "logit_bias"))
    text_act = TIMM_ACTIVATIONS[text.hidden_act]
    model = {
        "name": "converted_siglip",
        "image": {"type": "timm", "name": TIMM_NAME, "image_size": size, "patch_size": patch, "width": width,
                  "depth": int(vision.num_hidden_layers), "num_heads": int(vision.num_attention_heads),
                  "mean": list(mean), "std": list(std),
                  "options": {"patch_size": patch, "embed_dim": width, "depth": int(vision.num_hidden_layers),
                              "num_heads": int(vision.num_attention_heads),
                              "mlp_ratio": mlp_ratio(width, vision.intermediate_size),
                              "class_token": False, "global_pool": "map",
                              "act_layer": TIMM_ACTIVATIONS[vision.hidden_act]}},
        "text": {"type": "open_clip", "tokenizer": tok_field, "vocab_size": int(text.vocab_size),
                 "width": int(text.hidden_size), "depth": int(text.num_hidden_layers),
                 "num_heads": int(text.num_attention_heads), "max_length": int(text.max_position_embeddings),
                 "pooling": "eos", "options": _text_options(text, embed_dim, text_act)},
        "fusion": {"type": "none"}, "embed_dim": 0, "contrastive": "siglip", "siglip_bias": bias,
        "itm_head": False, "mlm_head": False, **temperature_fields(scale, siglip=True),
    }
    layers = (int(vision.num_hidden_layers), int(text.num_hidden_layers), width)
    return Plan(model_config_from(model), tok, tensors, lambda mapper: fill_siglip(mapper, *layers), notes)
