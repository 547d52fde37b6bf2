"""Attention (SDPA + explicit), MLP and transformer blocks, and the blocks' speed-only options (``Rows``,
``SharedContext``)."""

from vlp.layers.attention import Attention, attention, attention_by_context, key_padding_bias
from vlp.layers.blocks import (
    FUSION_INITS,
    TransformerBlock,
    init_cross_modal_weights,
    init_transformer_weights,
)
from vlp.layers.logit_scale import LogitScale
from vlp.layers.mlp import MLP
from vlp.layers.options import Rows, SharedContext

__all__ = ["Attention", "attention", "attention_by_context", "key_padding_bias", "MLP", "TransformerBlock", "init_transformer_weights", "init_cross_modal_weights", "FUSION_INITS", "LogitScale",
           "Rows", "SharedContext"]
