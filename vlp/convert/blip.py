"""Hugging Face ``BlipForImageTextRetrieval`` -> vlp: native ViT + a one-way dual-stream fusion that is also
the text tower.

BLIP's text encoder is a BERT whose every layer has cross-attention to the image. vlp builds it as a text
encoder of depth 0 (word + position embeddings, LayerNorm) and ``DualStreamFusion(update_image=False)`` of
BLIP's depth with ``fusion.share_text_layers``: for ITC the text encoder runs those same layers without
cross-attention (BLIP's text-only mode) and pools [CLS]; for ITM the fusion runs them with the image
tokens. vlp's post-norm layers are BertLayer's (self-attention, cross-attention, FFN, each
``LayerNorm(x + f(x))``, eps 1e-12). As in BLIP's retrieval training and evaluation, the first token of the
ITM pass is [ENC] (``text.fusion_first_token``); Hugging Face's ``BlipForImageTextRetrieval.forward`` feeds
whatever ids it is given, so it equals vlp when given the ids with [ENC] first.

The vision tower's fused ``qkv`` is split into vlp's q, k, v; ``vision_proj``/``text_proj``/``itm_head``
map to ``image_proj``/``text_proj``/``itm_head.classifier``. When the vision width differs from the text width
(BLIP large: 1024 and 768), ``fusion.image_width`` lets the cross-attention keys and values read the
image tokens at their own width, as BLIP's do. The checkpoint holds no ITC temperature:
vlp keeps BLIP's initial 0.07 (it does not change rankings).
"""

from __future__ import annotations

from pathlib import Path

from vlp.convert.common import Plan, StateMapper, hf_preprocessing, mlp_ratio, read_hf_directory, read_json
from vlp.data.tokenizers import load_tokenizer
from vlp.errors import UserError
from vlp.models.factory import model_config_from

__all__ = ["blip_plan", "fill_blip"]

BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ENC_TOKEN = "[ENC]"
TEMPERATURE_NOTE = "BlipForImageTextRetrieval keeps no ITC temperature; BLIP's initial 0.07 (rankings do not depend on it)"


def _attention(mapper: StateMapper, source: str, target: str) -> None:
    """BERT attention (``self.query/key/value``, ``output.dense``) -> vlp Attention (q, k, v, proj)."""
    for theirs, ours in (("query", "q"), ("key", "k"), ("value", "v")):
        mapper.copy_linear(f"{source}.self.{theirs}", f"{target}.{ours}")
    mapper.copy_linear(f"{source}.output.dense", f"{target}.proj")


def fill_blip(mapper: StateMapper, vision_layers: int, text_layers: int, width: int) -> None:
    vision, image = "vision_model.", "image_encoder."
    mapper.copy(f"{vision}embeddings.class_embedding", f"{image}cls_token")
    mapper.copy_linear(f"{vision}embeddings.patch_embedding", f"{image}patch_embed")
    mapper.copy(f"{vision}embeddings.position_embedding", f"{image}pos_embed")
    for i in range(vision_layers):
        s, t = f"{vision}encoder.layers.{i}", f"{image}blocks.{i}"
        for kind in ("weight", "bias"):
            mapper.split(f"{s}.self_attn.qkv.{kind}", [f"{t}.attn.{p}.{kind}" for p in "qkv"], [width] * 3)
        mapper.copy_parts(s, t, ("self_attn.projection", "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"))
    mapper.copy_linear(f"{vision}post_layernorm", f"{image}norm")
    text = "text_encoder."
    mapper.copy(f"{text}embeddings.word_embeddings.weight", "text_encoder.embeddings.weight")
    mapper.copy(f"{text}embeddings.position_embeddings.weight", "text_encoder.pos_embed")
    mapper.copy_linear(f"{text}embeddings.LayerNorm", "text_encoder.embed_norm")
    for i in range(text_layers):
        s, t = f"{text}encoder.layer.{i}", f"fusion.text_layers.{i}"
        _attention(mapper, f"{s}.attention", f"{t}.attn")
        mapper.copy_linear(f"{s}.attention.output.LayerNorm", f"{t}.norm1")
        _attention(mapper, f"{s}.crossattention", f"{t}.cross_attn")
        mapper.copy_linear(f"{s}.crossattention.output.LayerNorm", f"{t}.norm_cross")
        mapper.copy_linear(f"{s}.intermediate.dense", f"{t}.mlp.fc1")
        mapper.copy_linear(f"{s}.output.dense", f"{t}.mlp.fc2")
        mapper.copy_linear(f"{s}.output.LayerNorm", f"{t}.norm2")
    mapper.copy_linear("vision_proj", "image_proj")
    mapper.copy_linear("text_proj", "text_proj")
    mapper.copy_linear("itm_head", "itm_head.classifier")


def _check(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise UserError(f"{where}: {message}")


def blip_plan(src: Path, tokenizer: str | None) -> Plan:
    from transformers import BlipConfig

    config, tensors = read_hf_directory(src, BlipConfig, ("blip",), "a BLIP model (BlipForImageTextRetrieval)")
    where = str(src / "config.json")
    architectures = read_json(src / "config.json").get("architectures") or ["BlipForImageTextRetrieval"]
    _check("BlipForImageTextRetrieval" in architectures, where,
           f"architectures {architectures}: --from blip_itm converts BlipForImageTextRetrieval")
    vision, text = config.vision_config, config.text_config
    _check(vision.hidden_act == "gelu" and text.hidden_act == "gelu", where,
           f"hidden_act {vision.hidden_act}/{text.hidden_act}: vlp's blocks use gelu")
    _check(bool(text.is_decoder), where, "text_config.is_decoder is false: the text layers have no cross-attention")
    _check(text.layer_norm_eps == 1e-12, where, f"text layer_norm_eps {text.layer_norm_eps}: vlp's fusion uses 1e-12")
    _check(getattr(vision, "num_channels", 3) == 3, where, "vlp images have 3 channels")
    notes: list[str] = []
    tok = load_tokenizer(tokenizer or str(src))
    first_token = ENC_TOKEN if tok.backend.token_to_id(ENC_TOKEN) is not None else ""
    if not first_token:
        notes.append("the tokenizer has no [ENC] token: ITM reads the [CLS] state (as Hugging Face's forward)")
    mean, std = hf_preprocessing(src, int(vision.image_size), BLIP_MEAN, BLIP_STD, notes)
    model = {
        "name": "converted_blip_itm",
        "image": {"type": "vit", "image_size": int(vision.image_size), "patch_size": int(vision.patch_size),
                  "width": int(vision.hidden_size), "depth": int(vision.num_hidden_layers),
                  "num_heads": int(vision.num_attention_heads),
                  "mlp_ratio": mlp_ratio(vision.hidden_size, vision.intermediate_size),
                  "dropout": float(vision.attention_dropout), "layer_norm_eps": float(vision.layer_norm_eps),
                  "mean": list(mean), "std": list(std)},
        "text": {"type": "transformer", "tokenizer": tokenizer or str(src), "vocab_size": int(text.vocab_size),
                 "width": int(text.hidden_size), "depth": 0, "num_heads": int(text.num_attention_heads),
                 "max_length": int(text.max_position_embeddings), "pooling": "cls",
                 "dropout": float(text.hidden_dropout_prob), "fusion_first_token": first_token},
        "fusion": {"type": "dual_stream", "depth": int(text.num_hidden_layers),
                   "num_heads": int(text.num_attention_heads),
                   "mlp_ratio": mlp_ratio(text.hidden_size, text.intermediate_size),
                   "dropout": float(text.hidden_dropout_prob), "update_image": False, "share_text_layers": True,
                   # BLIP large: 1024-wide image tokens feed the 768-wide text layers' cross-attention directly
                   "image_width": int(vision.hidden_size) if vision.hidden_size != text.hidden_size else 0},
        "embed_dim": int(config.image_text_hidden_size), "contrastive": "itc", "temperature": 0.07,
        "temperature_min": 0.001, "temperature_max": 0.5, "itm_head": True, "mlm_head": False,
    }
    layers = (int(vision.num_hidden_layers), int(text.num_hidden_layers), int(vision.hidden_size))
    return Plan(model_config_from(model), tok, tensors, lambda mapper: fill_blip(mapper, *layers), notes,
                {"temperature.log_scale": TEMPERATURE_NOTE})
