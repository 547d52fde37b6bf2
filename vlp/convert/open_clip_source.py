"""open_clip checkpoints -> vlp models with open_clip towers (``type: open_clip``), no fusion.

Two sources:

- a directory in open_clip's ``local-dir:`` layout (``open_clip_config.json`` with ``model_cfg`` and
  ``preprocess_cfg``, and ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``), as
  ``open_clip``'s ``save_for_hf`` writes it;
- a checkpoint file with ``model`` = a built-in open_clip model name (e.g. ``ViT-B-32-quickgelu`` for
  OpenAI's weights) or the path of a model config JSON (``embed_dim``, ``vision_cfg``, ``text_cfg``).

Built-in names stay names in the vlp config; other configs are written out in the towers' ``options``
so the checkpoint rebuilds without open_clip's model registry. Tensors keep open_clip's names under
``image_encoder.visual.`` and ``text_encoder.text.``; ``logit_scale`` (and ``logit_bias``) become the
temperature (and SigLIP bias).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import Tensor

from vlp.convert.common import (
    SIGLIP_CLEANING_NOTE,
    Plan,
    StateMapper,
    canonicalizing,
    read_json,
    read_tensor_file,
    temperature_fields,
)
from vlp.data.tokenizers import Tokenizer, clip_tokenizer, load_tokenizer
from vlp.errors import UserError
from vlp.models.factory import model_config_from

__all__ = ["open_clip_plan", "towers_plan", "fill_towers"]

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Tower-config keys that vlp's open_clip builder derives from vlp fields when the preset name is empty:
# written explicitly so the rebuilt tower is the source's, not the builder's defaults.
VISION_KEYS = ("image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio")
TEXT_KEYS = ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pad_id", "pool_type", "eos_id")
FLAT_TEXT_MODULES = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


def _resolved(cfg_class: type, values: dict[str, Any], keys: tuple[str, ...], where: str) -> dict[str, Any]:
    try:
        full = dataclasses.asdict(cfg_class(**values))
    except TypeError as error:
        raise UserError(f"{where}: not an open_clip {cfg_class.__name__}: {error}") from error
    return {**{k: full[k] for k in keys}, **values}


def _square(size: Any, where: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise UserError(f"{where}: non-square image_size {list(size)} is not supported (vlp uses square inputs)")
        size = size[0]
    return int(size)


def towers_plan(model_cfg: dict[str, Any], name: str, tokenizer: Tokenizer, tokenizer_field: str,
                mean: tuple[float, ...], std: tuple[float, ...], tensors: dict[str, Tensor], where: str,
                title: str = "converted_open_clip") -> Plan:
    """The vlp plan for open_clip towers described by ``model_cfg`` (``name`` = a built-in name or empty);
    ``title`` is the vlp model name."""
    from open_clip import CLIPTextCfg, CLIPVisionCfg

    if "multimodal_cfg" in model_cfg:
        raise UserError(f"{where}: CoCa models (multimodal_cfg) are not supported")
    vision_cfg, text_cfg = dict(model_cfg.get("vision_cfg", {})), dict(model_cfg.get("text_cfg", {}))
    image_size = _square(vision_cfg.get("image_size", 224), where)
    context_length = int(text_cfg.get("context_length", 77))
    if name:
        image: dict[str, Any] = {"type": "open_clip", "name": name, "image_size": image_size}
        text: dict[str, Any] = {"type": "open_clip", "name": name}
    else:
        top = {"embed_dim": int(model_cfg["embed_dim"]), "quick_gelu": bool(model_cfg.get("quick_gelu", False))}
        vision = _resolved(CLIPVisionCfg, vision_cfg, VISION_KEYS, where)
        text_full = _resolved(CLIPTextCfg, text_cfg, TEXT_KEYS, where)
        image = {"type": "open_clip", "image_size": image_size, "options": {**top, **vision, "image_size": image_size}}
        text = {"type": "open_clip", "vocab_size": int(text_full["vocab_size"]), "options": {**top, **text_full}}
        if isinstance(vision["layers"], int) and isinstance(vision["width"], int):
            image |= {"width": vision["width"], "depth": vision["layers"],
                      "num_heads": max(1, vision["width"] // vision["head_width"]),
                      "patch_size": vision["patch_size"]}
        text |= {"width": text_full["width"], "depth": text_full["layers"], "num_heads": text_full["heads"]}
    image |= {"mean": list(mean), "std": list(std)}
    text |= {"tokenizer": tokenizer_field, "max_length": context_length,
             "causal": not text_cfg.get("no_causal_mask", False), "pooling": "eos"}
    siglip = "logit_bias" in tensors
    if "logit_scale" not in tensors:
        raise UserError(f"{where}: missing source tensors: logit_scale")
    scale = float(tensors["logit_scale"].float().reshape(-1)[0])
    model: dict[str, Any] = {
        "name": title, "image": image, "text": text, "fusion": {"type": "none"}, "embed_dim": 0,
        "contrastive": "siglip" if siglip else "itc", "itm_head": False, "mlm_head": False,
        **temperature_fields(scale, siglip),
    }
    if siglip:
        model["siglip_bias"] = float(tensors["logit_bias"].float().reshape(-1)[0])
    return Plan(model_config_from(model), tokenizer, tensors, lambda mapper: fill_towers(mapper, siglip))


def fill_towers(mapper: StateMapper, siglip: bool) -> None:
    """open_clip names -> vlp names: ``visual.*`` and the text tower (flat in CLIP, ``text.*`` in CustomTextCLIP)."""
    nested = any(k.startswith("text.") for k in mapper.source)
    for target in mapper.target:
        if target.startswith("image_encoder.visual."):
            mapper.copy(target.removeprefix("image_encoder."), target)
        elif target.startswith("text_encoder.text."):
            suffix = target.removeprefix("text_encoder.text.")
            mapper.copy(f"text.{suffix}" if nested else suffix, target)
    mapper.copy("logit_scale", "temperature.log_scale", lambda t: t.reshape(()))
    if siglip:
        mapper.copy("logit_bias", "temperature.bias", lambda t: t.reshape(()))


def _consensus_preprocessing(name: str, notes: list[str]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std of a built-in model's pretrained tags when they all agree, else open_clip's defaults (noted)."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    tags = open_clip.list_pretrained_tags_by_model(name)
    values = {(tuple(c.get("mean", OPENAI_DATASET_MEAN)), tuple(c.get("std", OPENAI_DATASET_STD)))
              for c in (open_clip.get_pretrained_cfg(name, tag) for tag in tags)}
    if len(values) == 1:
        mean, std = values.pop()
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    why = "do not agree on one" if values else "are none"
    notes.append(f"image mean/std: open_clip's defaults (the pretrained tags of {name} {why})")
    return tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD)


def _tokenizer(text_cfg: dict[str, Any], directory: Path | None, tokenizer: str | None,
               notes: list[str]) -> tuple[Tokenizer, str]:
    if tokenizer:
        return _cleaning(load_tokenizer(tokenizer), text_cfg, notes), tokenizer
    if not text_cfg.get("hf_tokenizer_name"):
        return clip_tokenizer(), "clip"
    if directory is not None and any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return _cleaning(load_tokenizer(str(directory)), text_cfg, notes), str(directory)
    raise UserError(f"the model's tokenizer is the Hugging Face tokenizer '{text_cfg['hf_tokenizer_name']}': "
                    "pass --tokenizer with its local tokenizer.json or directory (vlp never downloads)")


def _cleaning(tok: Tokenizer, text_cfg: dict[str, Any], notes: list[str]) -> Tokenizer:
    """open_clip's ``clean: canonicalize`` (its SigLIP configs) carried over; other cleanings noted."""
    kwargs = text_cfg.get("tokenizer_kwargs") or {}
    if kwargs.get("clean") == "canonicalize":
        notes.append(SIGLIP_CLEANING_NOTE)
        return canonicalizing(tok)
    if kwargs:
        notes.append(f"open_clip cleans text before tokenizing ({kwargs}); vlp uses the saved tokenizer as is")
    return tok


def open_clip_plan(src: Path, model: str | None, tokenizer: str | None) -> Plan:
    import open_clip

    notes: list[str] = []
    directory: Path | None = None
    if src.is_dir():
        if not (src / OPEN_CLIP_CONFIG).is_file():
            raise UserError(f"{src} has no {OPEN_CLIP_CONFIG}: give an open_clip local-dir or a checkpoint file")
        directory, data = src, read_json(src / OPEN_CLIP_CONFIG)
        model_cfg, name = dict(data.get("model_cfg", data)), ""
        weights = next((src / f for f in OPEN_CLIP_WEIGHTS if (src / f).is_file()), None)
        if weights is None:
            raise UserError(f"{src} has no {' or '.join(OPEN_CLIP_WEIGHTS)}")
        preprocess = data.get("preprocess_cfg", {})
        mean = tuple(float(v) for v in preprocess.get("mean", open_clip.constants.OPENAI_DATASET_MEAN))
        std = tuple(float(v) for v in preprocess.get("std", open_clip.constants.OPENAI_DATASET_STD))
    elif src.is_file():
        if not model:
            raise UserError("--model is required with an open_clip checkpoint file (a built-in model name or a "
                            "model config JSON)")
        weights = src
        if model.endswith(".json"):
            data = read_json(Path(model))
            model_cfg, name = dict(data.get("model_cfg", data)), ""
            mean, std = tuple(open_clip.constants.OPENAI_DATASET_MEAN), tuple(open_clip.constants.OPENAI_DATASET_STD)
            notes.append("image mean/std: open_clip's defaults (a model config JSON carries none)")
        else:
            preset = open_clip.get_model_config(model)
            if preset is None:
                raise UserError(f"--model '{model}' is not a built-in open_clip model name or a .json config")
            model_cfg, name = dict(preset), model
            mean, std = _consensus_preprocessing(model, notes)
    else:
        raise UserError(f"{src} does not exist (give an open_clip local-dir or a checkpoint file)")
    if not all(key in model_cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise UserError(f"{src}: the model config needs embed_dim, vision_cfg and text_cfg")
    tok, tok_field = _tokenizer(dict(model_cfg["text_cfg"]), directory, tokenizer, notes)
    plan = towers_plan(model_cfg, name, tok, tok_field, mean, std, read_tensor_file(weights), str(weights))
    plan.notes += notes
    return plan
