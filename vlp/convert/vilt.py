"""Hugging Face ``ViltModel`` / ``ViltForImageAndTextRetrieval`` -> vlp: embeddings-only encoders + single stream.

ViLT has no unimodal layers: the image side is a timm ViT of depth 0 without a final norm (conv patch
embedding, class token, learned positions, exactly ViLT's ``visual_embed`` for a full image of the
config's size), the text side vlp's native transformer of depth 0 (word + position embeddings, LayerNorm;
BERT's token-type-0 row is added to the position table, as every ViLT text token has type 0). The modality
embeddings (text 0, image 1), the pre-norm layers, the final LayerNorm and the tanh pooler are vlp's
``SingleStreamFusion``. ``rank_output`` (one logit) becomes the 2-class ITM head as [0, s], so column 1
minus column 0 is ViLT's score.

Differences, by design: vlp feeds square images of ``image_size`` (ViLT's processor keeps the aspect ratio,
up to 640 px, with a pixel mask), and keeps every patch (ViLT samples ``max_image_length`` patches when it
is positive and smaller than the patch count). ViLT has no contrastive head: ``encode_image`` and
``encode_text`` return its normalized [CLS] embeddings, which do not rank anything meaningfully, so
retrieval should re-rank every candidate by ITM (a large ``--k-test``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from vlp.convert.common import Plan, StateMapper, hf_preprocessing, mlp_ratio, read_hf_directory, read_json
from vlp.data.tokenizers import load_tokenizer
from vlp.errors import UserError
from vlp.models.factory import model_config_from

__all__ = ["vilt_plan", "fill_vilt"]

VILT_MEAN = VILT_STD = (0.5, 0.5, 0.5)
TIMM_NAME = "vit_base_patch32_384"  # any timm ViT: every architecture argument is set in options
TEMPERATURE_NOTE = "ViLT has no contrastive head (no temperature)"


def _rank_as_itm(weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """ViLT's one-logit rank head as two classes [0, s]: softmax/difference semantics keep s."""
    return torch.cat([torch.zeros_like(weight), weight]), torch.cat([torch.zeros_like(bias), bias])


def fill_vilt(mapper: StateMapper, prefix: str, layers: int, rank: bool) -> None:
    embeddings, text = f"{prefix}embeddings.", f"{prefix}embeddings.text_embeddings."
    mapper.copy(f"{embeddings}cls_token", "image_encoder.model.cls_token")
    mapper.copy_linear(f"{embeddings}patch_embeddings.projection", "image_encoder.model.patch_embed.proj")
    mapper.copy(f"{embeddings}position_embeddings", "image_encoder.model.pos_embed")
    mapper.copy(f"{text}word_embeddings.weight", "text_encoder.embeddings.weight")
    position, token_type = f"{text}position_embeddings.weight", f"{text}token_type_embeddings.weight"
    positions, types = mapper.take(position), mapper.take(token_type)
    folded = positions.float() + types[0].float() if positions.numel() and types.numel() else torch.empty(0)
    mapper.put("text_encoder.pos_embed", folded, [position, token_type])
    mapper.copy_linear(f"{text}LayerNorm", "text_encoder.embed_norm")
    mapper.copy(f"{embeddings}token_type_embeddings.weight", "fusion.modality_type.weight")
    for i in range(layers):
        s, t = f"{prefix}encoder.layer.{i}", f"fusion.blocks.{i}"
        for theirs, ours in (("query", "q"), ("key", "k"), ("value", "v")):
            mapper.copy_linear(f"{s}.attention.attention.{theirs}", f"{t}.attn.{ours}")
        mapper.copy_parts(s, t, ("attention.output.dense", "layernorm_before", "layernorm_after",
                                 "intermediate.dense", "output.dense"))
    mapper.copy_linear(f"{prefix}layernorm", "fusion.norm")
    mapper.copy_linear(f"{prefix}pooler.dense", "fusion.pooler")
    if rank:
        weight, bias = mapper.take("rank_output.weight"), mapper.take("rank_output.bias")
        if weight.numel() and bias.numel():
            weight, bias = _rank_as_itm(weight, bias)
        mapper.put("itm_head.classifier.weight", weight, ["rank_output.weight"])
        mapper.put("itm_head.classifier.bias", bias, ["rank_output.bias"])


def _check(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise UserError(f"{where}: {message}")


def vilt_plan(src: Path, tokenizer: str | None) -> Plan:
    from transformers import ViltConfig

    config, tensors = read_hf_directory(src, ViltConfig, ("vilt",),
                                        "a ViLT model (ViltModel or ViltForImageAndTextRetrieval)")
    where = str(src / "config.json")
    architectures = read_json(src / "config.json").get("architectures") or ["ViltModel"]
    _check(bool({"ViltModel", "ViltForImageAndTextRetrieval"} & set(architectures)), where,
           f"architectures {architectures}: --from vilt converts ViltModel or ViltForImageAndTextRetrieval")
    _check(config.hidden_act == "gelu", where, f"hidden_act {config.hidden_act}: vlp's blocks use gelu")
    _check(config.layer_norm_eps == 1e-12, where, f"layer_norm_eps {config.layer_norm_eps}: vlp uses 1e-12")
    _check(bool(config.qkv_bias), where, "qkv_bias false: vlp's attention has biases")
    _check(config.modality_type_vocab_size == 2, where,
           f"modality_type_vocab_size {config.modality_type_vocab_size}: vlp has two modalities (text, image)")
    _check(getattr(config, "num_channels", 3) == 3, where, "vlp images have 3 channels")
    prefix = "vilt." if any(k.startswith("vilt.") for k in tensors) else ""
    rank = "rank_output.weight" in tensors
    size, patch = int(config.image_size), int(config.patch_size)
    notes: list[str] = []
    patches = (size // patch) ** 2
    if 0 < int(config.max_image_length) < patches:
        notes.append(f"ViLT samples max_image_length={config.max_image_length} of the {patches} patches at random; "
                     "vlp keeps them all")
    if not rank:
        notes.append("no rank_output (a ViltModel): the converted model has no ITM head")
    notes.append("ViLT has no contrastive embedding: rank retrieval candidates by ITM (a large --k-test)")
    tok = load_tokenizer(tokenizer or str(src))
    mean, std = hf_preprocessing(src, size, VILT_MEAN, VILT_STD, notes)
    width, heads = int(config.hidden_size), int(config.num_attention_heads)
    model = {
        "name": "converted_vilt",
        "image": {"type": "timm", "name": TIMM_NAME, "image_size": size, "patch_size": patch, "width": width,
                  "depth": 0, "num_heads": heads, "mean": list(mean), "std": list(std),
                  "options": {"patch_size": patch, "embed_dim": width, "depth": 0, "num_heads": heads,
                              "class_token": True, "global_pool": "token", "final_norm": False}},
        "text": {"type": "transformer", "tokenizer": tokenizer or str(src), "vocab_size": int(config.vocab_size),
                 "width": width, "depth": 0, "num_heads": heads, "pooling": "cls",
                 "max_length": int(config.max_position_embeddings), "dropout": float(config.hidden_dropout_prob)},
        "fusion": {"type": "single_stream", "depth": int(config.num_hidden_layers), "num_heads": heads,
                   "mlp_ratio": mlp_ratio(width, config.intermediate_size),
                   "dropout": float(config.hidden_dropout_prob)},
        "embed_dim": 0, "itm_head": rank, "mlm_head": False,
    }
    layers = int(config.num_hidden_layers)
    return Plan(model_config_from(model), tok, tensors, lambda mapper: fill_vilt(mapper, prefix, layers, rank),
                notes, {"temperature.log_scale": TEMPERATURE_NOTE})
