"""Batching image-text samples: drop unreadable ones (counted), stack images, tokenize captions."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["Collator", "seed_worker"]

TokenizerFn = Callable[..., dict[str, Tensor]]


class Collator:
    """samples (dicts, or None for unreadable ones) -> {"images" [B,3,H,W], "input_ids" long [B,T],
    "attention_mask" bool [B,T], "image_ids" long [B], "captions" list[str], "bad" int}.

    Captions are padded to the longest in the batch (by the tokenizer) and truncated to ``max_length``.
    ``bad`` counts the dropped samples so the main process sees them even when workers read the data.
    A batch of only bad samples has B = 0.
    """

    def __init__(self, tokenizer: TokenizerFn, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, samples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        good = [s for s in samples if s is not None]
        bad = len(samples) - len(good)
        if not good:
            return {"images": torch.empty(0, 3, 0, 0), "input_ids": torch.empty(0, 0, dtype=torch.long),
                    "attention_mask": torch.empty(0, 0, dtype=torch.bool),
                    "image_ids": torch.empty(0, dtype=torch.long), "captions": [], "bad": bad}
        captions = [s["caption"] for s in good]
        tokens = self.tokenizer(captions, max_length=self.max_length)
        return {
            "images": torch.stack([s["image"] for s in good]),
            "input_ids": tokens["input_ids"].long(),
            "attention_mask": tokens["attention_mask"].bool(),
            "image_ids": torch.tensor([int(s["image_id"]) for s in good], dtype=torch.long),
            "captions": captions,
            "bad": bad,
        }


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed python and numpy from torch's per-worker seed (base seed + id)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)

