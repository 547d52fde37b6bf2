"""Output dataclasses shared by encoders, fusion blocks, losses and objectives."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
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

    def select(self, rows: Tensor | slice) -> EncoderOutput:
        """The rows ``rows`` (an index tensor or a slice) of all three fields.

        An index tensor may repeat rows (hard negatives drawn twice). It is read with ``index_select``, whose
        CPU backward adds the rows' gradients in index order; ``tokens[rows]``'s backward accumulates them
        from several threads in an order that changes from run to run, so a seeded run on two or more
        threads would not repeat itself (measured: the demo's losses parted at step 5)."""
        if isinstance(rows, slice):
            return EncoderOutput(self.tokens[rows], self.mask[rows], self.pooled[rows])
        rows = rows.to(self.tokens.device)
        return EncoderOutput(self.tokens.index_select(0, rows), self.mask.index_select(0, rows),
                             self.pooled.index_select(0, rows))

    @staticmethod
    def cat(parts: Sequence[EncoderOutput]) -> EncoderOutput:
        """The parts stacked along the batch, tokens right-padded (mask False) to the longest sequence.

        Padding never changes a fusion output, so parts of different lengths (chunks, caption batches)
        join without re-encoding."""
        length = max(part.tokens.shape[1] for part in parts)
        padded = [part if part.tokens.shape[1] == length else part.padded(length) for part in parts]
        return EncoderOutput(torch.cat([part.tokens for part in padded]), torch.cat([part.mask.bool() for part in padded]),
                             torch.cat([part.pooled for part in padded]))

    def padded(self, length: int) -> EncoderOutput:
        """Tokens right-padded with zeros, and the mask with False, to ``length`` positions."""
        pad = length - self.tokens.shape[1]
        return EncoderOutput(F.pad(self.tokens, (0, 0, 0, pad)), F.pad(self.mask, (0, pad), value=False), self.pooled)


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
