"""Which batch columns may serve as a negative: false-negative-aware exclusion rules and text keys.

A negative that is really a positive teaches the matcher to call one (image, text) relation both
"match" and "no match". Hard-negative mining finds exactly those: when a caption repeats across
images (web alt-texts, class-level captions), the most similar "other" text is the same text of
another image. The rules, from most to least strict (``objective.negative_exclusion``):

- ``text`` (default): a candidate text is excluded when it equals one of the row image's own
  captions in the batch; a candidate image is excluded when one of its captions in the batch equals
  the row's text; same image id and the pair itself are excluded too.
- ``image_id``: the pair itself and every column with the row's image id (ALBEF's retrieval
  fine-tuning rule).
- ``pair``: only the pair itself (ALBEF's pretraining rule).

Two texts are "equal" when their open_clip-canonicalized strings (lowercase, punctuation removed,
``_`` to space, whitespace collapsed) or their truncated token ids agree. Equality is tested on
64-bit blake2b keys, which are the same in every process, so the keys are gathered across ranks like
the embeddings (Python's ``hash()`` is salted per process and could not be).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["NEGATIVE_EXCLUSIONS", "TEXT_RULES", "shared_texts", "caption_key", "token_key", "text_keys", "negative_masks", "positive_mask"]

NEGATIVE_EXCLUSIONS = ("shared_text", "text", "image_id", "pair")
TEXT_RULES = ("shared_text", "text")  # the rules that read text keys
_MIX = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer (golden-ratio multiplier)


def _key(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def caption_key(caption: str) -> int:
    """64-bit key of a caption's canonical form: captions that differ only in case, punctuation, ``_`` or
    spacing get the same key."""
    from open_clip.tokenizer import canonicalize_text  # open_clip is heavy to import; only this needs it

    return _key(canonicalize_text(caption).encode("utf-8"))


def token_key(ids: Sequence[int] | np.ndarray) -> int:
    """64-bit key of a sequence of token ids (the real tokens of a truncated caption)."""
    return _key(np.asarray(ids, dtype=np.int64).tobytes())


def text_keys(input_ids: Tensor, attention_mask: Tensor, captions: Sequence[str] | None = None) -> Tensor:
    """long [B, 2]: column 0 the caption's canonical-text key, column 1 its token-id key (both columns the
    token key when the caption strings are not known)."""
    ids, mask = input_ids.detach().cpu().numpy(), attention_mask.detach().cpu().bool().numpy()
    tokens = [token_key(row[keep]) for row, keep in zip(ids, mask)]
    texts = tokens if captions is None else [caption_key(c) for c in captions]
    if len(texts) != len(tokens):
        raise ValueError(f"{len(texts)} captions for {len(tokens)} token rows")
    return torch.tensor(list(zip(texts, tokens)), dtype=torch.long, device=input_ids.device).reshape(-1, 2)


def _members(codes: Tensor, table: Tensor) -> Tensor:
    """bool, same shape as ``codes``: which codes occur in the sorted 1-d ``table``."""
    position = torch.searchsorted(table, codes.contiguous()).clamp(max=table.numel() - 1)
    return table[position] == codes


def _code(image_ids: Tensor, keys: Tensor) -> Tensor:
    """One 64-bit code per (image id, text key) pair (broadcasting); int64 products wrap around."""
    return (image_ids * _MIX) ^ keys


def _image_has_text(pair_ids: Tensor, pair_keys: Tensor, image_ids: Tensor, keys: Tensor) -> Tensor:
    """bool, the broadcast shape of ``image_ids`` and ``keys``: whether the batch holds a pair (image id,
    text) with that image and that text key. ``pair_ids`` [N] and ``pair_keys`` [N] are the batch's pairs.

    Each pair is coded into one number; a sorted-set lookup then answers the question for every
    (candidate, row) at the cost of a search, without comparing all N x N pairs of texts."""
    table = torch.unique(_code(pair_ids, pair_keys))
    return _members(_code(image_ids, keys), table)


def shared_texts(image_ids: Tensor, keys: Tensor) -> Tensor:
    """bool [N]: whether pair n's text (either key) is also the caption of another image among the N pairs:
    a caption written for two different images (an alt-text such as "logo", a class-level caption such as
    "a red circle") names a kind of image, not one image."""
    shared = torch.zeros(image_ids.shape[0], dtype=torch.bool, device=image_ids.device)
    for kind in range(keys.shape[1]):
        pairs = torch.unique(torch.stack([keys[:, kind], image_ids], dim=1), dim=0)  # distinct (text, image)
        texts, counts = torch.unique(pairs[:, 0], return_counts=True)
        if bool((counts > 1).any()):
            shared |= _members(keys[:, kind], texts[counts > 1])
    return shared


def negative_masks(rows: int, offset: int, image_ids: Tensor, keys: Tensor | None = None,
                   exclusion: str = "text") -> tuple[Tensor, Tensor]:
    """(valid text negatives, valid image negatives), bool [rows, N] each, for the local rows
    ``offset .. offset + rows`` of a gathered batch of N pairs.

    ``image_ids`` [N]: each pair's image id (gathered order); ``keys`` [N, K]: the pairs' text keys
    (``text_keys``), needed by ``exclusion="text"``. Column ``offset + r`` is row r's own pair.
    Entry [r, c] of the first mask says whether text c may be the negative text of image r, of the second
    whether image c may be the negative image of text r (see the module docstring for the rules)."""
    if exclusion not in NEGATIVE_EXCLUSIONS:
        raise ValueError(f"unknown negative exclusion {exclusion!r}; expected one of {', '.join(NEGATIVE_EXCLUSIONS)}")
    columns = image_ids.shape[0]
    device = image_ids.device
    local = torch.arange(rows, device=device)
    valid = torch.ones(rows, columns, dtype=torch.bool, device=device)
    valid[local, local + offset] = False
    if exclusion == "pair":
        return valid, valid.clone()
    row_ids = image_ids[offset:offset + rows]
    valid &= row_ids[:, None] != image_ids[None, :]
    valid_text, valid_image = valid, valid.clone()
    if exclusion in TEXT_RULES:
        if keys is None or keys.shape[0] != columns:
            raise ValueError(f"exclusion '{exclusion}' needs text keys for the {columns} columns")
        row_keys = keys[offset:offset + rows]
        for kind in range(keys.shape[1]):
            pair_keys = keys[:, kind]
            # text c is the negative text of image r: not when image r has a caption equal to text c
            valid_text &= ~_image_has_text(image_ids, pair_keys, row_ids[:, None], pair_keys[None, :])
            # image c is the negative image of text r: not when image c has a caption equal to text r
            valid_image &= ~_image_has_text(image_ids, pair_keys, image_ids[None, :], row_keys[:, kind, None])
        if exclusion == "shared_text":
            # a shared caption may be true of any image: it is no text negative, and its row gets no image negative
            shared = shared_texts(image_ids, keys)
            valid_text &= ~shared[None, :]
            valid_image &= ~shared[offset:offset + rows, None]
    return valid_text, valid_image


def positive_mask(row_ids: Tensor, column_ids: Tensor, row_keys: Tensor | None = None,
                  column_keys: Tensor | None = None) -> Tensor:
    """bool [R, C]: contrastive positives, pairs sharing an image id or, given text keys [R, K] and [C, K],
    pairs whose texts are equal (same canonical text or same token ids)."""
    positive = row_ids[:, None] == column_ids[None, :]
    if row_keys is not None and column_keys is not None:
        positive = positive | (row_keys[:, None, :] == column_keys[None, :, :]).any(dim=-1)
    return positive
