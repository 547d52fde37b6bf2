"""A pool of recent training pairs that ITM hard negatives are also mined from (``objective.itm_negative_pool``).

A batch of B pairs rarely holds the near-duplicates that ITM re-ranking must tell apart (ITC's top k of
a large gallery: same objects and colours, other shapes or positions), so the head trained on in-batch
negatives alone separates them less well than ITC does. The pool keeps this rank's last N pairs
(newest first): their raw images and token ids, to re-encode the ones drawn with the current towers, and
their detached embeddings, ids and text keys, to mine and exclude against. A drawn pool row is encoded
without gradient, so it trains the fusion block and the ITM head but not the towers; in-batch negatives
keep their gradient as before. The pool is part of the objective's state, so a resumed run draws exactly
what an uninterrupted one would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.collectives import is_main
from vlp.losses import NegativeDraw
from vlp.models.vlp_model import VLPModel
from vlp.types import EncoderOutput

__all__ = ["NegativePool", "PoolCandidates"]

log = logging.getLogger("vlp")

FIELDS = ("images", "input_ids", "attention_mask", "image_ids", "text_keys", "image_emb", "text_emb")


@dataclass
class PoolCandidates:
    """The mining columns of the pool, in pool order: embeddings, image ids and text keys (or None)."""

    image_emb: Tensor
    text_emb: Tensor
    image_ids: Tensor
    text_keys: Tensor | None


class NegativePool:
    """The last ``size`` training pairs of this rank, newest first."""

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"pool size must be > 0, got {size}")
        self.size = size
        self.tensors: dict[str, Tensor] = {}
        self._next_id = -1  # pairs without image ids get ids of their own, below every real id >= 0

    def __len__(self) -> int:
        return 0 if not self.tensors else int(self.tensors["images"].shape[0])

    def candidates(self) -> PoolCandidates:
        t = self.tensors
        return PoolCandidates(t["image_emb"], t["text_emb"], t["image_ids"], t.get("text_keys"))

    @torch.no_grad()
    def add(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, image_ids: Tensor | None,
            text_keys: Tensor | None, image_emb: Tensor, text_emb: Tensor) -> None:
        """Put a batch in front; the oldest pairs beyond ``size`` leave."""
        rows = images.shape[0]
        if image_ids is None:
            image_ids = torch.arange(self._next_id, self._next_id - rows, -1, device=images.device)
            self._next_id -= rows
        new = {"images": images, "input_ids": input_ids, "attention_mask": attention_mask.bool(),
               "image_ids": image_ids, "image_emb": image_emb.float(), "text_emb": text_emb.float()}
        if text_keys is not None:
            new["text_keys"] = text_keys
        new = {k: v.detach() for k, v in new.items()}
        if not self.tensors:
            self.tensors = {k: v[:self.size].clone() for k, v in new.items()}
            self._report_size(new)
            return
        if set(new) != set(self.tensors):
            raise ValueError("a batch's text keys appear or vanish between steps; the negative pool needs the same "
                             "fields every step")
        length = max(new["input_ids"].shape[1], self.tensors["input_ids"].shape[1])
        for part in (new, self.tensors):
            part["input_ids"] = _pad_to(part["input_ids"], length, 0)
            part["attention_mask"] = _pad_to(part["attention_mask"], length, False)
        self.tensors = {k: torch.cat([new[k], self.tensors[k]])[:self.size] for k in new}

    def _report_size(self, first: dict[str, Tensor]) -> None:
        """Say once what a full pool holds: its raw images stay in memory and go into every checkpoint."""
        if not is_main():
            return
        rows = first["images"].shape[0]
        per_pair = sum(v.element_size() * v[:1].numel() for v in first.values()) if rows else 0
        shape = "x".join(str(d) for d in first["images"].shape[1:])
        log.info("objective.itm_negative_pool %d: the pool keeps this rank's last %d training pairs (images %s), "
                 "about %.1f MB in memory and in every checkpoint's objective.safetensors",
                 self.size, self.size, shape, self.size * per_pair / 1e6)

    def extend(self, model: VLPModel, draw: NegativeDraw, columns: int, text_all: EncoderOutput,
               image_all: EncoderOutput) -> tuple[NegativeDraw, EncoderOutput, EncoderOutput]:
        """Append the drawn pool rows (draw indices >= ``columns``, the gathered batch size) to the gathered
        outputs, each distinct row encoded once by the current towers without gradient, and point the draw
        at them. The gathered rows keep their gradient."""
        t = self.tensors
        text_draw, image_draw = draw.text.clone(), draw.image.clone()
        text_pool, image_pool = text_draw >= columns, image_draw >= columns
        if text_pool.any():
            rows, slot = torch.unique(text_draw[text_pool] - columns, return_inverse=True)
            with torch.no_grad():
                out, _ = model.text_features(t["input_ids"][rows], t["attention_mask"][rows])
            text_draw[text_pool] = text_all.tokens.shape[0] + slot
            text_all = EncoderOutput.cat([text_all, _detached(out)])
        if image_pool.any():
            rows, slot = torch.unique(image_draw[image_pool] - columns, return_inverse=True)
            with torch.no_grad():
                out, _ = model.image_features(t["images"][rows])
            image_draw[image_pool] = image_all.tokens.shape[0] + slot
            image_all = EncoderOutput.cat([image_all, _detached(out)])
        moved = NegativeDraw(text_draw, image_draw, draw.has_text, draw.has_image, draw.excluded_fraction)
        return moved, text_all, image_all

    # persistence (part of the objective's extra state) -----------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        if not self.tensors:
            return {}
        state = dict(self.tensors)
        state["next_id"] = torch.tensor(self._next_id)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.tensors = {k: v.clone() for k, v in state.items() if k in FIELDS}
        if "attention_mask" in self.tensors:
            self.tensors["attention_mask"] = self.tensors["attention_mask"].bool()
        self._next_id = int(state["next_id"]) if "next_id" in state else -1


def _pad_to(tensor: Tensor, length: int, value: int | bool) -> Tensor:
    return F.pad(tensor, (0, length - tensor.shape[1]), value=value) if tensor.shape[1] < length else tensor


def _detached(out: EncoderOutput) -> EncoderOutput:
    return EncoderOutput(out.tokens.detach(), out.mask, out.pooled.detach())
