"""Hugging Face ``CLIPModel`` -> vlp with open_clip towers (the same architecture: pre-norm blocks, QuickGELU).

HF's separate q/k/v projections are concatenated into open_clip's ``in_proj``; ``visual_projection`` and
``text_projection`` (Linear weights [E, W]) become open_clip's projection matrices [W, E] (transposed).
The text embedding is the end-of-text state: HF configs with ``eos_token_id`` 2 (written before
transformers PR #24773) take the largest id (open_clip's ``argmax``), newer ones the first end-of-text
token (open_clip's ``eos`` pooling with that id).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from vlp.convert.common import Plan, StateMapper, clip_layers, hf_preprocessing, mlp_ratio, read_hf_directory
from vlp.convert.open_clip_source import towers_plan
from vlp.data.tokenizers import load_tokenizer
from vlp.errors import UserError

__all__ = ["clip_plan", "hf_blocks_to_open_clip", "open_clip_activation"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def open_clip_activation(name: str, where: str) -> dict[str, Any]:
    """open_clip tower options for a Hugging Face ``hidden_act``."""
    if name == "quick_gelu":
        return {"quick_gelu": True}
    if name == "gelu":
        return {"quick_gelu": False}
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return {"quick_gelu": False, "act_kwargs": {"approximate": "tanh"}}
    raise UserError(f"{where}: hidden_act '{name}' has no open_clip equivalent (quick_gelu, gelu, gelu_pytorch_tanh)")


def _norm(eps: float) -> dict[str, Any]:
    return {} if eps == 1e-5 else {"norm_kwargs": {"eps": eps}}  # open_clip's LayerNorm default is 1e-5


def hf_blocks_to_open_clip(mapper: StateMapper, source: str, target: str, layers: int) -> None:
    """HF CLIP/SigLIP encoder layers -> open_clip residual attention blocks."""
    clip_layers(mapper, source, target, layers, "open_clip")


def _transpose(tensor: Tensor) -> Tensor:
    return tensor.T


def fill_clip(mapper: StateMapper, vision_layers: int, text_layers: int) -> None:
    vision, visual = "vision_model.", "image_encoder.visual."
    mapper.copy(f"{vision}embeddings.class_embedding", f"{visual}class_embedding")
    mapper.copy(f"{vision}embeddings.patch_embedding.weight", f"{visual}conv1.weight")
    mapper.copy(f"{vision}embeddings.position_embedding.weight", f"{visual}positional_embedding")
    mapper.copy_linear(f"{vision}pre_layrnorm", f"{visual}ln_pre")
    hf_blocks_to_open_clip(mapper, f"{vision}encoder.layers", f"{visual}transformer.resblocks", vision_layers)
    mapper.copy_linear(f"{vision}post_layernorm", f"{visual}ln_post")
    mapper.copy("visual_projection.weight", f"{visual}proj", _transpose)
    text, tower = "text_model.", "text_encoder.text."
    mapper.copy(f"{text}embeddings.token_embedding.weight", f"{tower}token_embedding.weight")
    mapper.copy(f"{text}embeddings.position_embedding.weight", f"{tower}positional_embedding")
    hf_blocks_to_open_clip(mapper, f"{text}encoder.layers", f"{tower}transformer.resblocks", text_layers)
    mapper.copy_linear(f"{text}final_layer_norm", f"{tower}ln_final")
    mapper.copy("text_projection.weight", f"{tower}text_projection", _transpose)
    mapper.copy("logit_scale", "temperature.log_scale", lambda t: t.reshape(()))


def clip_plan(src: Path, tokenizer: str | None) -> Plan:
    from transformers import CLIPConfig

    config, tensors = read_hf_directory(src, CLIPConfig, ("clip",), "a CLIP model (CLIPModel)")
    vision, text = config.vision_config, config.text_config
    where = str(src / "config.json")
    if getattr(vision, "num_channels", 3) != 3:
        raise UserError(f"{where}: vision num_channels {vision.num_channels}: vlp images have 3 channels")
    activation = open_clip_activation(vision.hidden_act, where)
    if open_clip_activation(text.hidden_act, where) != activation:
        raise UserError(f"{where}: the vision ({vision.hidden_act}) and text ({text.hidden_act}) activations differ")
    notes: list[str] = []
    tok = load_tokenizer(tokenizer or str(src))
    end_id = int(tok([""], max_length=8)["input_ids"][0, -1])
    legacy = text.eos_token_id == 2
    if not legacy and end_id != text.eos_token_id:
        raise UserError(f"{where}: eos_token_id {text.eos_token_id} is not the tokenizer's end-of-text id {end_id}")
    pooling = {"pool_type": "argmax"} if legacy else {"pool_type": "eos", "eos_id": int(text.eos_token_id)}
    model_cfg = {
        "embed_dim": int(config.projection_dim), "quick_gelu": activation["quick_gelu"],
        "vision_cfg": {
            "image_size": int(vision.image_size), "patch_size": int(vision.patch_size),
            "width": int(vision.hidden_size), "layers": int(vision.num_hidden_layers),
            "head_width": int(vision.hidden_size) // int(vision.num_attention_heads),
            "mlp_ratio": mlp_ratio(vision.hidden_size, vision.intermediate_size),
            **{k: v for k, v in activation.items() if k != "quick_gelu"}, **_norm(vision.layer_norm_eps)},
        "text_cfg": {
            "context_length": int(text.max_position_embeddings), "vocab_size": int(text.vocab_size),
            "width": int(text.hidden_size), "heads": int(text.num_attention_heads),
            "layers": int(text.num_hidden_layers), "mlp_ratio": mlp_ratio(text.hidden_size, text.intermediate_size),
            "pad_id": tok.pad_id, **pooling,
            **{k: v for k, v in activation.items() if k != "quick_gelu"}, **_norm(text.layer_norm_eps)},
    }
    mean, std = hf_preprocessing(src, int(vision.image_size), CLIP_MEAN, CLIP_STD, notes)
    plan = towers_plan(model_cfg, "", tok, tokenizer or str(src), mean, std, tensors, where, "converted_clip")
    plan.fill = lambda mapper: fill_clip(mapper, int(vision.num_hidden_layers), int(text.num_hidden_layers))
    plan.notes += notes
    return plan
