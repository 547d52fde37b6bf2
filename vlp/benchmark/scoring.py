"""Scores of listed (image, caption) pairs and the selection metrics built on them.

The compositionality benchmarks ask, per example, which of a few captions (or images) fits: each needs the
ITC cosine, and for a fused model the ITM match logit, of a handful of pairs. ``score_pairs`` encodes every
distinct image and caption once, in chunks of images (so a fused model's image tokens never all sit in
memory), and under torchrun each rank scores the pairs of its own block of images.

Axis legend: n = pairs, e = examples, o = options per example.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Subset
from tqdm.auto import tqdm

from vlp.collectives import rank_and_world, shard_rows
from vlp.eval.rerank import itm_pair_scores
from vlp.eval.retrieval import encode_images, encode_texts, resolve_device
from vlp.precision import DEFAULT_PRECISION, autocast_context, resolve_precision

__all__ = ["score_pairs", "resolved_precision", "choice_correct", "winoground_scores", "group_accuracy"]

IMAGE_CHUNK = 512  # images whose encoder outputs are held at once for ITM


def resolved_precision(precision: str, device: torch.device) -> str:
    return resolve_precision(precision, device)


@torch.no_grad()
def score_pairs(model: Any, images: Any, captions: Sequence[str], pair_image: Tensor, pair_text: Tensor,
                batch_size: int = 128, precision: str = DEFAULT_PRECISION, device: str | torch.device | None = None,
                progress: bool = True, num_workers: int = 0, image_chunk: int = IMAGE_CHUNK) -> dict[str, Tensor]:
    """{"itc": cosine [n], "itm": match logit [n] (fused models only)} of the pairs (images[pair_image[n]],
    captions[pair_text[n]]); ``images`` is a map-style dataset of image tensors. A collective under torchrun:
    every rank calls it with the same arguments and gets every pair's scores."""
    target = resolve_device(model, device)
    autocast = autocast_context(resolved_precision(precision, target), target)
    fused = bool(model.has_fusion)
    rank, world = rank_and_world()
    show = progress and rank == 0
    pair_image, pair_text = pair_image.long().cpu(), pair_text.long().cpu()
    names = ("itc", "itm") if fused else ("itc",)
    scores = {name: torch.zeros(len(pair_image), dtype=torch.float32, device=target) for name in names}
    was_training = model.training
    model.eval()
    try:
        block = shard_rows(len(images), rank, world)
        for start in tqdm(range(block.start, block.stop, image_chunk), desc="score pairs", disable=not show):
            stop = min(start + image_chunk, block.stop)
            pairs = ((pair_image >= start) & (pair_image < stop)).nonzero()[:, 0]
            if not len(pairs):
                continue
            image_emb, image_out = encode_images(model, Subset(images, range(start, stop)), batch_size, num_workers,
                                                 target, autocast, fused, False)
            needed, text_index = torch.unique(pair_text[pairs], return_inverse=True)
            text_emb, text_out = encode_texts(model, [captions[t] for t in needed.tolist()], batch_size, target,
                                              autocast, fused, False)
            local_image = (pair_image[pairs] - start).to(target)
            text_index = text_index.to(target)
            at = pairs.to(target)
            scores["itc"][at] = (image_emb[local_image] * text_emb[text_index]).sum(dim=-1)
            if fused:
                assert image_out is not None and text_out is not None
                scores["itm"][at] = itm_pair_scores(model, image_out, text_out, local_image, text_index,
                                                    batch_size, autocast).to(target)
    finally:
        model.train(was_training)
    if world > 1:
        for value in scores.values():
            dist.all_reduce(value)  # each pair is scored by the one rank that holds its image; the rest add 0
    return {name: value.cpu() for name, value in scores.items()}


# ------------------------------------------------------------------------------------------ metrics
def choice_correct(scores: Tensor, true_option: int | Tensor = 0) -> Tensor:
    """[e] bool: the true option scores strictly above every other option of its example. scores [e, o].

    Ties count as wrong (as SugarCrepe's ``pos_score > neg_score``)."""
    truth = torch.as_tensor(true_option).expand(scores.shape[0]).long()
    true_score = scores.gather(1, truth[:, None])
    others = torch.ones_like(scores, dtype=torch.bool).scatter_(1, truth[:, None], False)
    return ((scores < true_score) | ~others).all(dim=1)


def winoground_scores(scores: Tensor) -> dict[str, Tensor]:
    """Winoground's text, image and group scores per example [e] from scores [e, 2, 2] indexed
    [caption, image]: caption c belongs to image c.

    text: each image prefers its own caption; image: each caption prefers its own image; group: both."""
    c0i0, c0i1, c1i0, c1i1 = scores[:, 0, 0], scores[:, 0, 1], scores[:, 1, 0], scores[:, 1, 1]
    text = (c0i0 > c1i0) & (c1i1 > c0i1)
    image = (c0i0 > c0i1) & (c1i1 > c1i0)
    return {"text": text, "image": image, "group": text & image}


def group_accuracy(correct: Tensor, groups: Sequence[str], min_count: int = 1,
                   exclude: Sequence[str] = ()) -> tuple[float, dict[str, float], int]:
    """(macro accuracy in percent over the groups with at least ``min_count`` examples and not excluded,
    per-group accuracy of those groups, how many groups count)."""
    members: dict[str, list[bool]] = {}
    for value, group in zip(correct.tolist(), groups, strict=True):
        members.setdefault(group, []).append(bool(value))
    skip = set(exclude)
    per_group = {group: 100.0 * sum(values) / len(values) for group, values in sorted(members.items())
                 if len(values) >= min_count and group not in skip}
    macro = sum(per_group.values()) / len(per_group) if per_group else float("nan")
    return macro, per_group, len(per_group)


def percent(values: Tensor) -> float:
    return 100.0 * values.double().mean().item() if len(values) else float("nan")
