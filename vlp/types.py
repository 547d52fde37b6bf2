"""Output dataclasses shared by encoders, fusion blocks, losses and objectives."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["EncoderOutput", "FusionOutput", "LossOutput"]


@dataclass
class EncoderOutput:
    """An encoder's output.

    tokens: [B, N, D] token states; mask: bool [B, N], True = real token;
    pooled: [B, E] the encoder's own embedding (e.g. open_clip's after its projection).
    """

    tokens: Tensor
    mask: Tensor
    pooled: Tensor


@dataclass
class FusionOutput:
    """A fusion block's output: text [B, T, D], image [B, I, D], pooled [B, P] (P = ``out_dim``).

    ``attentions`` is filled only when the block is called with ``return_attention=True``:
    one entry per layer, a dict of attention-weight tensors [B, H, Nq, Nk] keyed by kind
    (``"self"``, ``"text_to_image"``, ``"image_to_text"``).
    """

    text: Tensor
    image: Tensor
    pooled: Tensor
    attentions: list[dict[str, Tensor]] | None = None


@dataclass
class LossOutput:
    """A loss module's or objective's result: the scalar to optimize and its named terms."""

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
