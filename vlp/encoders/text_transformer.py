"""Native text transformer: token + learned position embeddings and a stack of vlp.layers blocks.

Two layouts, picked by ``causal`` so each matches the model family it stands for:

- ``causal=False`` (BERT-like, bidirectional, what MLM needs): embedding LayerNorm, post-norm blocks
  (``norm(x + f(x))``, LayerNorm eps 1e-12 as BERT); the last block's output is already normalized.
- ``causal=True`` (CLIP-like text tower): pre-norm blocks (``x + f(norm(x))``) and a final LayerNorm.

Pooling: ``cls`` = first token (not allowed with ``causal``: it would only see itself), ``eos`` = last
real token (CLIP's end-of-text, as inputs are right-padded), ``mean`` = mean over real tokens.
There is no projection: ``embed_dim == width``. Axis legend: b = batch, t = tokens, d = width.

BLIP's text tower (depth 0): ``share_fusion_layers`` lets the encoder run a one-way fusion's layers
without cross-attention for its pooled embedding (ITC), while ``tokens`` stay the embeddings that the
fusion runs through the same layers with the image (ITM); ``fusion_first_token`` puts BLIP's [ENC]
in place of [CLS] in those tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlp.config.schema import TextEncoderConfig
from vlp.data.tokenizers import Tokenizer
from vlp.encoders.base import TextEncoder
from vlp.encoders.vit import init_transformer_weights
from vlp.errors import ConfigError
from vlp.layers import Rows, TransformerBlock
from vlp.registry import text_encoders
from vlp.types import EncoderOutput

__all__ = ["TextTransformer", "build_text_transformer", "POOLINGS"]

POOLINGS = ("cls", "eos", "mean")


def _pooled_position(mask: Tensor, pooling: str) -> Tensor:
    """[b] index of the pooled token: 0 for ``cls``; for ``eos`` the last real token (also correct if padding
    is not a contiguous suffix)."""
    if pooling == "cls":
        return torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).amax(dim=1).clamp(min=0)


def pool_tokens(tokens: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """[b, t, d] tokens and bool mask [b, t] -> [b, d] by ``cls`` / ``eos`` (last real token) / ``mean``."""
    if pooling in ("cls", "eos"):
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), _pooled_position(mask, pooling)]
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class TextTransformer(TextEncoder):
    """input_ids [b, t], attention_mask [b, t] -> tokens [b, t, width], pooled [b, width]."""

    computes_pooled_only = True

    def __init__(self, vocab_size: int, max_length: int, width: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, causal: bool = False, pooling: str = "cls",
                 fusion_first_token: int | None = None) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling '{pooling}' is not one of {', '.join(POOLINGS)}")
        if causal and pooling == "cls":
            raise ValueError("pooling 'cls' with causal attention: the first token only sees itself; use 'eos'")
        self.width = self.embed_dim = width
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.causal = causal
        self.bidirectional = not causal
        self.pooling = pooling
        eps = 1e-6 if causal else 1e-12
        self.embeddings = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(max_length, width))
        self.embed_norm: nn.Module = nn.Identity() if causal else nn.LayerNorm(width, eps=eps)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, num_heads, mlp_ratio=mlp_ratio, dropout=dropout, pre_norm=causal, eps=eps)
            for _ in range(depth))
        self.final_norm: nn.Module = nn.LayerNorm(width, eps=eps) if causal else nn.Identity()
        self.grad_checkpointing = False
        self.fusion_layers: nn.ModuleList | None = None
        self.fusion_first_token: int | None = fusion_first_token
        if fusion_first_token is not None and depth:
            raise ValueError("fusion_first_token needs depth 0: the tokens given to the fusion are the embeddings")
        self.apply(init_transformer_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def share_fusion_layers(self, layers: nn.ModuleList) -> None:
        """Run ``layers`` (a one-way fusion's text layers, shared, not copied) for the pooled embedding;
        their cross-attention is skipped without an image, as BLIP's text encoder in text-only mode."""
        if len(self.blocks) or self.causal:
            raise ValueError("only a bidirectional text encoder of depth 0 can share the fusion's layers")
        self.fusion_layers = layers

    def _embed(self, input_ids: Tensor) -> Tensor:
        return self.drop(self.embed_norm(self.embeddings(input_ids) + self.pos_embed[:input_ids.shape[1]]))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pooled_only: bool = False) -> EncoderOutput:
        """``pooled_only`` (cls/eos pooling, no shared fusion layers): only what the pooled embedding depends on
        is computed (a dual encoder's ITC reads nothing else): no all-padding columns, and only the pooled row
        in the last block; ``tokens`` and ``mask`` then hold that row [b, 1, ...]."""
        length = input_ids.shape[1]
        if length > self.max_length:
            raise ValueError(f"{length} tokens exceed the encoder's max_length {self.max_length}")
        mask = attention_mask.bool()
        pooled_rows = None
        if (pooled_only and self.pooling != "mean" and self.fusion_layers is None and self.fusion_first_token is None
                and len(self.blocks)):
            # Columns after every row's last real token (fixed-length padding, e.g. CLIP's 77) can reach no
            # pooled output — keys are masked, and a causal EOS sees only earlier positions — so they are dropped.
            real_columns = mask.any(dim=0).nonzero()
            if len(real_columns):
                keep = int(real_columns.max()) + 1
                input_ids, mask = input_ids[:, :keep], mask[:, :keep]
            pooled_rows = Rows.at(_pooled_position(mask, self.pooling))
        x = self._embed(input_ids)
        for index, block in enumerate(self.blocks):
            rows = pooled_rows if index == len(self.blocks) - 1 else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, causal=self.causal, rows=rows, use_reentrant=False)
            else:
                x = block(x, mask, causal=self.causal, rows=rows)
        if pooled_rows is not None:
            tokens = self.final_norm(x)
            return EncoderOutput(tokens=tokens, mask=tokens.new_ones(tokens.shape[:2], dtype=torch.bool),
                                 pooled=tokens[:, 0])
        tokens = self.final_norm(x)
        states = tokens
        for layer in self.fusion_layers if self.fusion_layers is not None else ():
            states = layer(states, mask)
        if self.fusion_first_token is not None:
            first = torch.full_like(input_ids[:, :1], self.fusion_first_token)
            tokens = self.final_norm(self._embed(torch.cat([first, input_ids[:, 1:]], dim=1)))
        return EncoderOutput(tokens=tokens, mask=mask, pooled=pool_tokens(states, mask, self.pooling))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


@text_encoders.register("transformer")
def build_text_transformer(cfg: TextEncoderConfig, tokenizer: Tokenizer) -> TextTransformer:
    if cfg.pooling not in POOLINGS:
        raise ConfigError(f"text.pooling '{cfg.pooling}' is not one of {', '.join(POOLINGS)}")
    if cfg.causal and cfg.pooling == "cls":
        raise ConfigError("text.pooling 'cls' with text.causal: the first token only sees itself; use 'eos'")
    if cfg.width % cfg.num_heads != 0:
        raise ConfigError(f"text.width {cfg.width} is not divisible by text.num_heads {cfg.num_heads}")
    if cfg.options:
        raise ConfigError(f"text.options {sorted(cfg.options)} are not used by the native transformer encoder")
    vocab_size = cfg.vocab_size or tokenizer.vocab_size
    if vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"text.vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    first_token = None
    if cfg.fusion_first_token:
        if cfg.depth:
            raise ConfigError("text.fusion_first_token needs text.depth 0 (the fusion's tokens are the embeddings)")
        first_token = tokenizer.backend.token_to_id(cfg.fusion_first_token)
        if first_token is None:
            raise ConfigError(f"text.fusion_first_token '{cfg.fusion_first_token}' is not in the tokenizer's vocabulary")
    encoder = TextTransformer(vocab_size, cfg.max_length, cfg.width, cfg.depth, cfg.num_heads,
                              mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout, causal=cfg.causal, pooling=cfg.pooling,
                              fusion_first_token=first_token)
    if cfg.weights:
        from vlp.encoders.timm_encoder import load_weights, read_weights

        load_weights(encoder, read_weights(cfg.weights), cfg.weights)
    return encoder
