"""save_pretrained / from_pretrained: config.yaml + model.safetensors + tokenizer/.

The saved config is made portable: local weight paths are cleared and a Hugging Face text tower is
rebuilt from its stored config, so loading never re-reads the files the original config pointed at.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import safetensors.torch
import yaml

from vlp.config.io import from_dict, to_dict
from vlp.config.schema import ModelConfig
from vlp.errors import UserError
from vlp.models.vlp_model import VLPModel

__all__ = ["save_pretrained", "load_pretrained", "FORMAT_VERSION", "portable_config"]

FORMAT_VERSION = 1


def portable_config(model: VLPModel) -> ModelConfig:
    config: ModelConfig = model.config
    image = dataclasses.replace(config.image, weights="")
    text = dataclasses.replace(config.text, weights="")  # the tokenizer is read from tokenizer/
    hf_config = getattr(model.text_encoder, "hf_config_dict", None)
    if config.text.type == "hf" and callable(hf_config):
        text = dataclasses.replace(text, name="", options=hf_config())
    return dataclasses.replace(config, image=image, text=text)


def save_pretrained(model: VLPModel, directory: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write a checkpoint directory. Call it on a temporary directory for atomic checkpoints."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    enc = model.image_encoder
    data: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": to_dict(portable_config(model)),
        "image_transform": {"image_size": enc.image_size, "mean": list(enc.mean), "std": list(enc.std)},
    }
    if extra:
        data.update(extra)
    (out / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    # save_model handles tied weights (the MLM decoder shares the token embedding).
    safetensors.torch.save_model(model, str(out / "model.safetensors"))
    if model.tokenizer is not None:
        model.tokenizer.save(out / "tokenizer")


def read_checkpoint_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.yaml"
    if not path.is_file():
        raise UserError(f"not a vlp checkpoint (no config.yaml): {directory}")
    data = yaml.safe_load(path.read_text()) or {}
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: unsupported checkpoint format_version {version!r} (expected {FORMAT_VERSION})")
    return data


def load_pretrained(directory: str | Path) -> VLPModel:
    from vlp.data.tokenizers import Tokenizer
    from vlp.models.factory import build_model

    root = Path(directory)
    data = read_checkpoint_config(root)
    config = from_dict(ModelConfig, data["model"], prefix="model")
    tokenizer = Tokenizer.load(root / "tokenizer")
    model = build_model(config, tokenizer=tokenizer)
    weights = root / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"checkpoint has no model.safetensors: {root}")
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False)
    except Exception as exc:  # a truncated or corrupted file
        raise UserError(f"{weights}: cannot read weights ({exc})") from None
    if missing or unexpected:
        raise UserError(
            f"{weights}: weights do not match the config: missing {sorted(missing)[:8]}, "
            f"unexpected {sorted(unexpected)[:8]}"
        )
    model.eval()
    return model
