"""What every source converter shares: reading a local checkpoint, the tensor mapper that records which
source tensor became which vlp tensor, the conversion plan and its report.

A converter reads a source into a ``Plan`` (a vlp model config, the source's tokenizer, the source tensors
and a function that maps them onto the built model with a ``StateMapper``). ``StateMapper.finish`` checks
the result strictly: a source tensor that is missing, left unused or of the wrong shape, a vlp tensor left
uninitialized, or a non-finite value fails the conversion with one line naming the tensors.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from vlp.config.schema import ModelConfig
from vlp.data.tokenizers import Tokenizer
from vlp.errors import UserError, one_line, some

__all__ = ["ConversionReport", "Plan", "StateMapper", "read_hf_directory", "read_tensor_file", "read_json",
           "hf_preprocessing", "mlp_ratio", "temperature_fields", "clip_layers",
           "canonicalizing", "SIGLIP_CLEANING_NOTE"]

# Buffers that older transformers versions saved although they are derived, never learned.
DERIVED_BUFFERS = (".position_ids", ".token_type_ids", "attn_mask")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# A transformer block's parts besides q/k/v, always in this order: attention output projection, the two
# norms, the MLP's two layers. vlp's own blocks and timm's name them alike; open_clip and HF CLIP/SigLIP do not.
_BLOCK_PARTS = ("attn.proj", "norm1", "norm2", "mlp.fc1", "mlp.fc2")
_OPEN_CLIP_PARTS = ("attn.out_proj", "ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj")
_HF_CLIP_PARTS = ("self_attn.out_proj", "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")


@dataclass
class ConversionReport:
    """The outcome of one conversion, also written as ``conversion.json`` beside the checkpoint.

    ``links`` pairs each vlp tensor with the source tensors it was made from; ``unused_source`` and
    ``uninitialized`` are empty after a successful conversion (anything else fails it); ``ignored`` lists
    derived buffers an old checkpoint carried; ``defaulted`` names the vlp tensors the source has no
    counterpart for, with the reason (e.g. a temperature that ViLT never had).
    """

    source_type: str
    source: str
    output: str
    links: dict[str, list[str]] = field(default_factory=dict)
    unused_source: list[str] = field(default_factory=list)
    uninitialized: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    defaulted: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def patterns(self) -> list[tuple[str, str]]:
        """(source pattern, vlp pattern) rows, layer indices written as ``{i}`` (the table docs/convert.md shows)."""
        rows: dict[tuple[str, str], None] = {}
        for target, sources in self.links.items():
            rows[(_joined([_pattern(s) for s in sources]), _pattern(target))] = None
        return list(rows)

    def to_json(self) -> dict[str, Any]:
        return {"source_type": self.source_type, "source": self.source, "output": self.output,
                "tensors": len(self.links), "unused_source_tensors": self.unused_source,
                "uninitialized_vlp_tensors": self.uninitialized, "ignored_source_buffers": self.ignored,
                "defaulted_vlp_tensors": self.defaulted, "notes": self.notes,
                "mapping": [list(row) for row in self.patterns()]}

    def summary(self) -> str:
        lines = [f"converted {self.source_type} {self.source} -> {self.output}: {len(self.links)} vlp tensors "
                 f"from the source; unused source tensors: {len(self.unused_source)}; "
                 f"uninitialized vlp tensors: {len(self.uninitialized)}"]
        lines += [f"  kept at its config value: {name} ({why})" for name, why in self.defaulted.items()]
        if self.ignored:
            lines.append(f"  ignored derived buffers: {some(self.ignored)}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".{i}.", name)


def _joined(names: list[str]) -> str:
    """Several source names as one: ``a.q_proj.w``, ``a.k_proj.w`` -> ``a.{q,k}_proj.w``."""
    if len(names) == 1:
        return names[0]
    prefix = os.path.commonprefix(names)
    suffix = os.path.commonprefix([n[len(prefix):][::-1] for n in names])[::-1]
    middles = [n[len(prefix): len(n) - len(suffix)] for n in names]
    return f"{prefix}{{{','.join(middles)}}}{suffix}"


@dataclass
class Plan:
    """A converter's result: the model config to build, its tokenizer, the source tensors, and ``fill``,
    which maps the tensors onto the built model's state-dict names."""

    config: ModelConfig
    tokenizer: Tokenizer
    tensors: dict[str, Tensor]
    fill: Callable[[StateMapper], None]
    notes: list[str] = field(default_factory=list)
    defaulted: dict[str, str] = field(default_factory=dict)


class StateMapper:
    """Builds a vlp state dict from source tensors, recording every use; ``finish`` checks it strictly."""

    def __init__(self, source: dict[str, Tensor], target: dict[str, Tensor], origin: str) -> None:
        self.source, self.target, self.origin = source, target, origin
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.wrong: list[str] = []
        self.values: dict[str, Tensor] = {}
        self.links: dict[str, list[str]] = {}

    def take(self, name: str) -> Tensor:
        """A source tensor, marked used; a missing one is recorded (the conversion then fails) and a
        zero-size stand-in returned so the mapping can go on and name every problem at once."""
        if name not in self.source:
            self.missing.append(name)
            return torch.empty(0)
        self.used.add(name)
        return self.source[name]

    def put(self, target: str, value: Tensor, sources: list[str]) -> None:
        self.values[target] = value
        self.links[target] = sources

    def copy(self, source: str, target: str, transform: Callable[[Tensor], Tensor] | None = None) -> None:
        value = self.take(source)
        self.put(target, transform(value) if transform is not None and value.numel() else value, [source])

    def copy_linear(self, source: str, target: str) -> None:
        """A Linear/LayerNorm/Conv module: ``.weight`` and ``.bias``."""
        for suffix in ("weight", "bias"):
            self.copy(f"{source}.{suffix}", f"{target}.{suffix}")

    def copy_parts(self, source: str, target: str, source_parts: tuple[str, ...],
                   target_parts: tuple[str, ...] = _BLOCK_PARTS) -> None:
        """Linear/LayerNorm modules under ``source`` -> under ``target``, paired by position; by default the
        targets are a vlp/timm block's ``attn.proj``, ``norm1``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``."""
        for theirs, ours in zip(source_parts, target_parts, strict=True):
            self.copy_linear(f"{source}.{theirs}", f"{target}.{ours}")

    def concat(self, sources: list[str], target: str) -> None:
        """Separate q/k/v projections -> one fused in_proj/qkv tensor (rows in the given order)."""
        values = [self.take(s) for s in sources]
        fused = torch.cat(values, dim=0) if all(v.numel() for v in values) else torch.empty(0)
        self.put(target, fused, sources)

    def split(self, source: str, targets: list[str], sizes: list[int]) -> None:
        """One fused tensor -> consecutive row blocks of ``sizes`` (a fused qkv -> q, k, v)."""
        value = self.take(source)
        if value.numel() and value.shape[0] != sum(sizes):
            self.wrong.append(f"{source} {list(value.shape)}: expected {sum(sizes)} rows")
            return
        parts = torch.split(value, sizes, dim=0) if value.numel() else [torch.empty(0)] * len(targets)
        for target, part in zip(targets, parts):
            self.put(target, part, [source])

    def finish(self, defaulted: dict[str, str]) -> tuple[dict[str, Tensor], ConversionReport]:
        """The full state dict for the model and a report; any problem is one UserError line."""
        shared = _shared_names(self.target)
        for name in list(self.values):  # a tensor shared by two modules (BLIP's text layers) is set once
            for alias in shared.get(name, ()):
                self.values.setdefault(alias, self.values[name])
        ignored = sorted(k for k in self.source if k not in self.used and k.endswith(DERIVED_BUFFERS))
        unused = sorted(k for k in self.source if k not in self.used and k not in ignored)
        uninitialized = sorted(k for k in self.target if k not in self.values and k not in defaulted)
        unknown = sorted(k for k in self.values if k not in self.target)
        wrong = self.wrong + [f"{k} {list(v.shape)} vs {list(self.target[k].shape)}" for k, v in self.values.items()
                              if k in self.target and v.numel() and v.shape != self.target[k].shape]
        bad = sorted({s for k, sources in self.links.items() for s in sources
                      if self.values[k].is_floating_point() and not bool(torch.isfinite(self.values[k]).all())})
        problems = [f"{label}: {some(names)}" for label, names in (
            ("missing source tensors", self.missing), ("unused source tensors", unused),
            ("wrong shape (source vs vlp)", wrong), ("vlp tensors left uninitialized", uninitialized),
            ("non-finite values in", bad), ("unknown vlp tensors", unknown)) if names]
        if problems:
            raise UserError(f"{self.origin}: cannot convert: " + "; ".join(problems))
        state = {k: v.to(self.target[k].dtype).contiguous() for k, v in self.values.items()}
        for name in defaulted:
            state[name] = self.target[name]
        report = ConversionReport("", self.origin, "", links=dict(self.links), ignored=ignored,
                                  defaulted=dict(defaulted))
        return state, report


# Blocks with one fused q/k/v projection: its name ({kind}: weight or bias), then the other parts
_FUSED_QKV_BLOCKS = {"open_clip": ("attn.in_proj_{kind}", _OPEN_CLIP_PARTS),
                     "timm": ("attn.qkv.{kind}", _BLOCK_PARTS)}


def clip_layers(mapper: StateMapper, source: str, target: str, layers: int,
                block: Literal["open_clip", "timm"]) -> None:
    """Hugging Face CLIP/SigLIP encoder layers ``source.{i}`` -> open_clip or timm blocks ``target.{i}``
    (HF's separate q, k, v projections concatenated, in that order, into the block's fused one)."""
    fused, parts = _FUSED_QKV_BLOCKS[block]
    for i in range(layers):
        s, t = f"{source}.{i}", f"{target}.{i}"
        for kind in ("weight", "bias"):
            mapper.concat([f"{s}.self_attn.{p}_proj.{kind}" for p in "qkv"], f"{t}.{fused.format(kind=kind)}")
        mapper.copy_parts(s, t, _HF_CLIP_PARTS, parts)


def _shared_names(state: dict[str, Tensor]) -> dict[str, list[str]]:
    """Names whose tensors share storage (tied or shared modules): name -> its aliases."""
    groups: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for name, value in state.items():
        if value.numel():
            groups.setdefault((value.data_ptr(), tuple(value.shape)), []).append(name)
    return {name: [n for n in names if n != name] for names in groups.values() if len(names) > 1 for name in names}


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {one_line(error)}") from error
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return data


def read_tensor_file(path: Path) -> dict[str, Tensor]:
    """All tensors of one .safetensors / .bin / .pt file (training-checkpoint wrappers unwrapped)."""
    from vlp.encoders.timm_encoder import read_weights

    return read_weights(str(path))


def _weight_files(directory: Path) -> list[Path]:
    for name in HF_WEIGHT_FILES:
        if (directory / name).is_file():
            return [directory / name]
        index = directory / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            if not shards:
                raise UserError(f"{index} lists no weight files")
            return [directory / shard for shard in shards]
    raise UserError(f"{directory} has no weights ({' or '.join(HF_WEIGHT_FILES)}, or a sharded index)")


def read_hf_directory(directory: Path, config_class: Any, model_types: tuple[str, ...],
                      expected: str) -> tuple[Any, dict[str, Tensor]]:
    """A local Hugging Face model directory: (its config as ``config_class``, all its tensors)."""
    if not directory.is_dir():
        raise UserError(f"{directory} is not a local Hugging Face model directory (vlp never downloads)")
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} has no config.json: not a Hugging Face model directory")
    model_type = read_json(directory / "config.json").get("model_type")
    if model_type not in model_types:
        raise UserError(f"{directory / 'config.json'}: model_type '{model_type}' is not {expected}")
    try:
        config = config_class.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise UserError(f"cannot read {directory / 'config.json'}: {one_line(error)}") from error
    tensors: dict[str, Tensor] = {}
    for path in _weight_files(directory):
        tensors.update(read_tensor_file(path))
    return config, tensors


def hf_preprocessing(directory: Path, image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                     notes: list[str]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std from ``preprocessor_config.json``; the architecture's usual values (noted) if absent.

    vlp's eval transform resizes the shorter side to ``image_size`` and center-crops, as CLIP's processor;
    BLIP's and SigLIP's processors resize to the square directly, ViLT's keeps the aspect ratio (up to 640 px).
    """
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        notes.append(f"no preprocessor_config.json: image mean/std are the architecture's usual {list(mean)}/"
                     f"{list(std)}, size {image_size}")
        return mean, std
    data = read_json(path)
    try:
        mean = tuple(float(v) for v in data.get("image_mean", mean))
        std = tuple(float(v) for v in data.get("image_std", std))
    except (TypeError, ValueError) as error:
        raise UserError(f"{path}: image_mean/image_std are not lists of numbers") from error
    if len(mean) != 3 or len(std) != 3:
        raise UserError(f"{path}: image_mean and image_std need 3 values each")
    return mean, std


SIGLIP_CLEANING_NOTE = ("text is canonicalized before tokenizing (open_clip's SigLIP 'clean: canonicalize': "
                        "lowercase, punctuation removed, '_' to a space, whitespace collapsed)")


def canonicalizing(tokenizer: Tokenizer, pad_id: int | None = None) -> Tokenizer:
    """``tokenizer`` with ``text_cleaning: canonicalize`` (and ``pad_id`` when given), for a converted SigLIP
    model: SigLIP's text was canonicalized in training, and open_clip and Hugging Face canonicalize too."""
    return Tokenizer(tokenizer.backend, pad_id=tokenizer.pad_id if pad_id is None else pad_id,
                     mask_id=tokenizer.mask_id, cls_id=tokenizer.cls_id, special_ids=tokenizer.special_ids,
                     text_cleaning="canonicalize")


def mlp_ratio(width: int, hidden: int) -> float:
    """A ratio r with ``int(width * r) == hidden``, as every vlp/open_clip/timm block computes its MLP width."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def temperature_fields(logit_scale: float, siglip: bool) -> dict[str, float]:
    """ModelConfig temperature keys for a learned log logit scale; the clamp bounds widen to admit it."""
    import math

    if not math.isfinite(logit_scale):
        raise UserError(f"cannot convert: non-finite values in: logit_scale ({logit_scale})")
    temperature = math.exp(-logit_scale)
    low, high = (0.001, 100.0) if siglip else (0.01, 100.0)
    return {"temperature": temperature, "temperature_min": min(low, temperature),
            "temperature_max": max(high, temperature)}
