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
    "attention_mask" bool [B,T], "image_ids" long [B], "captions" list[str], "text_keys" long [B, 2]
    (``vlp.losses.negatives.text_keys``, for the ITM false-negative rule), "bad" int,
    "bad_paths" list[str], "bad_reasons" list[str], "truncated" int, "unk_tokens" int, "word_tokens" int}.

    Captions are padded to the longest in the batch (by the tokenizer) and truncated to ``max_length``;
    ``truncated`` counts the captions that lost tokens. ``bad`` counts the dropped samples so the main
    process sees them even when workers read the data. With ``bad_source`` (the dataset, which must offer
    ``take_bad() -> (list of (path, reason), count of bad samples that yielded nothing)``), the paths of
    this batch's bad samples travel with it too: the collator runs in the worker that read them.
    A batch of only bad samples has B = 0. ``unk_tokens`` / ``word_tokens`` count the caption tokens unknown
    to the tokenizer among its non-special ones (a vocabulary that does not cover the captions; 0 / 0 for a
    tokenizer without ``count_unknown``).
    """

    def __init__(self, tokenizer: TokenizerFn, max_length: int, bad_source: Any = None) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.bad_source = bad_source

    def __call__(self, samples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        good = [s for s in samples if s is not None]
        bad = len(samples) - len(good)
        reported: list[tuple[str, str]] = []
        if self.bad_source is not None:
            reported, unyielded = self.bad_source.take_bad()
            bad += unyielded
        report = {"bad": bad, "bad_paths": [path for path, _ in reported],
                  "bad_reasons": [reason for _, reason in reported]}
        if not good:
            return {"images": torch.empty(0, 3, 0, 0), "input_ids": torch.empty(0, 0, dtype=torch.long),
                    "attention_mask": torch.empty(0, 0, dtype=torch.bool),
                    "image_ids": torch.empty(0, dtype=torch.long), "captions": [], "truncated": 0,
                    "unk_tokens": 0, "word_tokens": 0, **report}
        captions = [s["caption"] for s in good]
        tokens = self.tokenizer(captions, max_length=self.max_length)
        count = getattr(self.tokenizer, "count_unknown", None)
        unknown, words = count(tokens["input_ids"], tokens["attention_mask"]) if count is not None else (0, 0)
        from vlp.losses.negatives import text_keys  # hashing here runs in the loader workers, off the step

        return {
            "text_keys": text_keys(tokens["input_ids"], tokens["attention_mask"], captions),
            "images": torch.stack([s["image"] for s in good]),
            "input_ids": tokens["input_ids"].long(),
            "attention_mask": tokens["attention_mask"].bool(),
            "image_ids": torch.tensor([int(s["image_id"]) for s in good], dtype=torch.long),
            "captions": captions,
            "truncated": self._count_truncated(captions, tokens["attention_mask"]),
            "unk_tokens": unknown, "word_tokens": words,
            **report,
        }

    def _count_truncated(self, captions: list[str], attention_mask: Tensor) -> int:
        """Captions that filled ``max_length`` are re-tokenized one token longer: those that then exceed
        it were cut. Only full-length rows are re-tokenized, so the usual batch costs nothing extra."""
        full = (attention_mask.sum(dim=1) >= self.max_length).nonzero().flatten().tolist()
        if not full:
            return 0
        longer = self.tokenizer([captions[i] for i in full], max_length=self.max_length + 1)
        return int((longer["attention_mask"].sum(dim=1) > self.max_length).sum())


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed python and numpy from torch's per-worker seed (base seed + id)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)

