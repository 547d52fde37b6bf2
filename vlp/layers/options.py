"""The speed-only options of attention and transformer blocks, each one argument.

Both change how much is computed, never what a computed output is: ``Rows`` picks the output rows a block
computes, ``SharedContext`` hands a cross-attention a context prepared earlier (cached keys/values, and
which of several shared contexts each query row reads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Rows", "SharedContext"]


@dataclass(frozen=True, eq=False)
class Rows:
    """The one row of each sequence a block computes an output for, [b, n, d] -> [b, 1, d]; the row's
    attention still reads every key, so it equals that row of the full output.

    ``Rows.first()``: the first row ([CLS]), what a last layer needs when only the pooled state is read (ITM
    scoring, a dual encoder's ITC); not with causal attention, where the first token sees only itself.
    ``Rows.at(index)``: row ``index[b]`` of sequence b, index [b] long (e.g. the EOS token a causal text
    tower pools). A block given no ``Rows`` computes every row.
    """

    index: Tensor | None = None

    @classmethod
    def first(cls) -> Rows:
        return cls()

    @classmethod
    def at(cls, index: Tensor) -> Rows:
        return cls(index)

    @property
    def is_first(self) -> bool:
        return self.index is None

    def positions(self, x: Tensor) -> Tensor:
        """[b] long: the computed row of each of x's [b, n, d] sequences."""
        if self.index is None:
            return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.index


@dataclass(frozen=True, eq=False)
class SharedContext:
    """A cross-attention context prepared for the query rows (speed only).

    ``kv``: the (keys, values) [g, h, m, d] that ``Attention.key_value(context)`` computed earlier, used
    instead of projecting the context again. ``index`` [b] long: the context (or ``kv``) holds g shared
    sequences and query row b reads sequence ``index[b]``; the rows that read one sequence attend in one
    call, so its keys/values are projected once and never copied per row, and the key mask is then per
    sequence [g, m]. Without ``index`` row b reads sequence b (g = b).
    """

    kv: tuple[Tensor, Tensor] | None = None
    index: Tensor | None = None
