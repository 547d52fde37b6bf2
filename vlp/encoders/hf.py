"""A Hugging Face transformers text model as a bidirectional text encoder.

``name`` set: ``AutoModel.from_pretrained(name, local_files_only=True)`` from a local directory (the model's
own dropout settings are kept; ``options`` are config overrides). ``name`` empty: a randomly initialised
model of ``options["model_type"]`` (default ``bert``) from ``AutoConfig.for_model(model_type, **options)``;
for BERT the defaults come from the text config (``width``, ``depth``, ``num_heads``, ``mlp_ratio``,
``dropout``, ``max_length``, vocabulary = ``vocab_size`` or the tokenizer's) and ``options`` override them.
So a loaded model can be rebuilt offline from ``options = encoder.model.config.to_dict()``.
Models that have a pooler are built without it.
tokens = ``last_hidden_state``; pooled = by ``cfg.pooling`` (``cls`` = the [CLS] state, the default).
If the tokenizer has more ids than the embedding table (an appended mask token), the table is resized.
"""

from __future__ import annotations

import inspect
import pickle
import re
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vlp.config.schema import TextEncoderConfig
from vlp.data.tokenizers import Tokenizer
from vlp.encoders.base import TextEncoder
from vlp.encoders.text_transformer import POOLINGS, pool_tokens
from vlp.errors import ConfigError, UserError, one_line
from vlp.registry import text_encoders
from vlp.types import EncoderOutput

__all__ = ["HFTextEncoder", "build_hf"]


class HFTextEncoder(TextEncoder):
    """Wraps a ``transformers.PreTrainedModel`` that returns ``last_hidden_state``."""

    model: Any  # a transformers PreTrainedModel

    def __init__(self, model: Any, pooling: str = "cls") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling '{pooling}' is not one of {', '.join(POOLINGS)}")
        self.model = model
        self.pooling = pooling
        self.width = self.embed_dim = int(model.config.hidden_size)
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.bidirectional = True

    @property
    def embeddings(self) -> nn.Embedding:
        """The input token embedding (an MLM head ties its decoder weight to it)."""
        embedding: nn.Embedding = self.model.get_input_embeddings()
        return embedding

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> EncoderOutput:
        mask = attention_mask.bool()
        tokens = self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        return EncoderOutput(tokens=tokens, mask=mask, pooled=pool_tokens(tokens, mask, self.pooling))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        model, kwargs = self.model, {"use_reentrant": False}
        # transformers renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn, and go
        # in v6); older releases have only the old names
        if hasattr(model, "activation_checkpointing_enable"):
            if enable:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.activation_checkpointing_disable()
        elif enable:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_disable()


def _without_pooler(model_class: Any) -> dict[str, Any]:
    accepts_pooler = "add_pooling_layer" in inspect.signature(model_class.__init__).parameters
    return {"add_pooling_layer": False} if accepts_pooler else {}


def _random_model(cfg: TextEncoderConfig, tokenizer: Tokenizer) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    options = dict(cfg.options)
    model_type = str(options.pop("model_type", "bert"))
    defaults: dict[str, Any] = {"vocab_size": cfg.vocab_size or tokenizer.vocab_size}
    if model_type == "bert":
        defaults |= {
            "hidden_size": cfg.width,
            "num_hidden_layers": cfg.depth,
            "num_attention_heads": cfg.num_heads,
            "intermediate_size": int(cfg.width * cfg.mlp_ratio),
            "hidden_dropout_prob": cfg.dropout,
            "attention_probs_dropout_prob": cfg.dropout,
            "max_position_embeddings": max(512, cfg.max_length),
            "pad_token_id": tokenizer.pad_id,
        }
    try:
        config = AutoConfig.for_model(model_type, **{**defaults, **options})
        model_class: Any = MODEL_MAPPING[type(config)]
        return model_class(config, **_without_pooler(model_class))
    except (TypeError, ValueError, KeyError) as error:
        raise ConfigError(f"text.options do not configure a '{model_type}' model: {one_line(error)}"
                          ) from error


def _local_model(cfg: TextEncoderConfig) -> Any:
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    directory = Path(cfg.name).expanduser()
    if not directory.is_dir():
        raise UserError(f"text.name '{cfg.name}' is not a local model directory (vlp never downloads models)")
    try:
        # trust_remote_code=False: never import a directory's own modeling code (and never prompt for it)
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False,
                                            **cfg.options)
        model_class = MODEL_MAPPING[type(config)]
        return AutoModel.from_pretrained(str(directory), config=config, local_files_only=True,
                                         trust_remote_code=False, **_without_pooler(model_class))
    except pickle.UnpicklingError as error:  # a .bin weights file is read with torch.load(weights_only=True)
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise UserError(f"refused: the weights in {directory} hold a pickled object"
                        f"{f' ({found.group(1)})' if found else ''}, not only tensors; vlp never unpickles code "
                        "(use model.safetensors)") from error
    except (OSError, ValueError, KeyError, TypeError) as error:
        if "trust_remote_code" in str(error):
            raise UserError(f"refused: {directory} needs its own Python code to load (custom code); "
                            "vlp never runs code from model directories") from error
        raise UserError(f"cannot load a Hugging Face model from {directory}: {one_line(error)}") from error


@text_encoders.register("hf")
def build_hf(cfg: TextEncoderConfig, tokenizer: Tokenizer) -> HFTextEncoder:
    if cfg.pooling not in POOLINGS:
        raise ConfigError(f"text.pooling '{cfg.pooling}' is not one of {', '.join(POOLINGS)}")
    if cfg.causal:
        raise ConfigError("text.causal is not supported by the hf encoder (it wraps bidirectional encoders)")
    if cfg.weights:
        raise ConfigError("text.weights is not used by the hf encoder: point text.name at the model directory")
    model = _local_model(cfg) if cfg.name else _random_model(cfg, tokenizer)
    if tokenizer.vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(tokenizer.vocab_size)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and cfg.max_length > max_positions:
        raise ConfigError(f"text.max_length {cfg.max_length} exceeds the model's {max_positions} positions")
    return HFTextEncoder(model, pooling=cfg.pooling)
