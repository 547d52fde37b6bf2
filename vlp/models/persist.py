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
from torch import nn

from vlp.config.io import from_dict, to_dict
from vlp.config.schema import ModelConfig
from vlp.config.validate import validate_model_config
from vlp.errors import UserError, some
from vlp.models.vlp_model import VLPModel

__all__ = ["save_pretrained", "load_pretrained", "FORMAT_VERSION", "portable_config", "load_weights_file",
           "resolve_checkpoint_dir"]

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
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:  # safe_load also refuses !!python tags: nothing in a checkpoint runs code
        raise UserError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a checkpoint config must be a YAML mapping")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: unsupported checkpoint format_version {version!r} (expected {FORMAT_VERSION})")
    return data


def _is_checkpoint(directory: Path) -> bool:
    return (directory / "config.yaml").is_file() and (directory / "model.safetensors").is_file()


def _step_of(path: Path) -> int:
    suffix = path.name.removeprefix("step_")
    return int(suffix) if suffix.isdigit() else -1


def resolve_checkpoint_dir(directory: str | Path) -> Path:
    """The checkpoint a directory names: itself, or for a run directory (``runs/<name>``) its ``final/``.

    A run directory without ``final/`` (a stopped run) is one UserError line listing the checkpoints it
    has, so the user can pick one; anything else that is not a checkpoint says so.
    """
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"checkpoint directory not found: {root}")
    if _is_checkpoint(root):
        return root
    if _is_checkpoint(root / "final"):
        return root / "final"
    steps = sorted((p for p in (root / "checkpoints").glob("step_*") if _is_checkpoint(p)), key=_step_of)
    if steps or (root / "metrics.jsonl").is_file() or (root / "checkpoints").is_dir():
        listing = ", ".join(str(p) for p in steps) if steps else "none"
        raise UserError(f"{root} is a run directory without a final/ checkpoint; its checkpoints: {listing}")
    if (root / "config.yaml").is_file():
        return root  # read_checkpoint_config names what is wrong with it
    raise UserError(f"not a vlp checkpoint (no config.yaml): {root}")


def load_pretrained(directory: str | Path, image_size: int = 0) -> VLPModel:
    """A model from a checkpoint directory, or from a run directory's ``final/`` checkpoint.

    ``image_size`` > 0 and not the checkpoint's: the image tower is rebuilt for that resolution with its
    position embeddings interpolated (vlp.models.resolution; logged as a one-line note)."""
    from vlp.data.tokenizers import Tokenizer
    from vlp.models.factory import build_model

    root = resolve_checkpoint_dir(directory)
    data = read_checkpoint_config(root)
    if not isinstance(data.get("model"), dict):
        raise UserError(f"{root / 'config.yaml'}: no 'model' mapping")
    config = from_dict(ModelConfig, data["model"], prefix="model")
    validate_model_config(config)  # a checkpoint's config is input too: impossible values fail as one line
    tokenizer = Tokenizer.load(root / "tokenizer")
    model = build_model(config, tokenizer=tokenizer)
    weights = root / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"checkpoint has no model.safetensors: {root}")
    load_weights_file(model, weights)
    if image_size > 0:
        from vlp.models.resolution import change_image_size

        change_image_size(model, image_size)
    model.eval()
    return model


def load_weights_file(model: nn.Module, path: Path, device: str = "cpu") -> None:
    """Load a safetensors file into ``model`` (tied weights stored once are fine); any mismatch with the
    model, or an unreadable file, is one UserError line naming the tensors and shapes."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            shapes = {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as exc:  # truncated or not a safetensors file; the reader raises several types
        raise UserError(f"{path}: cannot read weights ({' '.join(str(exc).split())})") from None
    own = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    wrong = [f"{name} {shapes[name]} vs {own[name]}" for name in own if name in shapes and shapes[name] != own[name]]
    if wrong:
        raise UserError(f"{path}: tensor shapes do not match the config (file vs model): {some(wrong)}")
    missing, unexpected = safetensors.torch.load_model(model, str(path), strict=False, device=device)
    problems = [f"{label} {some(sorted(names))}" for label, names in (("missing", missing), ("unexpected", unexpected))
                if names]
    if problems:
        raise UserError(f"{path}: weights do not match the config: {'; '.join(problems)}")
