"""Evaluation sharded over the ranks of a process group: retrieval and VQA.

Retrieval: rank r encodes one contiguous block of the images and one of the captions; the embeddings are
gathered (no gradient), so every rank holds both galleries ([N_img, e] and [N_txt, e]) and ranks only its
own queries against them, in memory-bounded chunks (never an N_img x N_txt matrix). ITM re-ranking: each
(image, caption) pair of either direction's top-k is scored by the rank that holds that image's encoder
output, so image tokens never leave their rank; that rank re-encodes the captions it needs (the text
encoder is cheap next to fusion). Ranks and scores are then gathered: every rank returns the same result,
equal to ``evaluate_retrieval`` in one process up to float noise in the encoders' batching.

VQA: questions are dealt out in contiguous blocks; the predictions are gathered and scored once.

Axis legend: q = queries, g = gallery, k = candidates per query, e = embedding width.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Subset

from vlp.collectives import gather_no_grad, gather_objects, rank_and_world
from vlp.config.validate import k_test_for_gallery
from vlp.errors import UserError
from vlp.eval.rerank import itm_pair_scores, match_rule_for, reranked_ranks, with_itc
from vlp.eval.retrieval import (
    SCORES,
    RetrievalSplitLike,
    _as_index_tensor,
    _FirstImages,
    _validate_img2txt,
    chunked_ranks,
    chunked_topk,
    encode_images,
    encode_texts,
    evaluate_retrieval,
    recall_curves,
    recall_metrics,
    resolve_device,
    split_images,
)
from vlp.precision import DEFAULT_PRECISION, AutocastFactory, autocast_context, resolve_precision
from vlp.types import EncoderOutput

__all__ = ["shard_rows", "gather_shards", "evaluate_retrieval_sharded", "evaluate_vqa_sharded", "vqa_metrics"]


def shard_rows(total: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous block of ``range(total)``; block sizes differ by at most one."""
    return range(rank * total // world, (rank + 1) * total // world)


def gather_shards(local: Tensor, total: int) -> Tensor:
    """Every rank's block (``shard_rows``) of a [total, ...] tensor, concatenated in order (no gradient).

    Blocks are padded to the largest for the all-gather, then the padding is dropped.
    """
    rank, world = rank_and_world()
    if world == 1:
        return local
    sizes = [len(shard_rows(total, r, world)) for r in range(world)]
    if local.shape[0] != sizes[rank]:
        raise ValueError(f"rank {rank} holds {local.shape[0]} rows; its block of {total} has {sizes[rank]}")
    padded = F.pad(local, (*([0, 0] * (local.dim() - 1)), 0, max(sizes) - sizes[rank]))
    gathered = gather_no_grad(padded)
    return torch.cat([gathered[r * max(sizes):r * max(sizes) + size] for r, size in enumerate(sizes)])


@torch.no_grad()
def evaluate_retrieval_sharded(model: Any, split: RetrievalSplitLike, transform: Any, k_test: int = 16,
                               score: str = "itm", batch_size: int = 128, precision: str = DEFAULT_PRECISION,
                               device: str | torch.device | None = None, progress: bool = True,
                               max_images: int = 0, memory_mb: float = 1024,
                               num_workers: int = 0) -> dict[str, Any]:
    """``evaluate_retrieval`` with the work split over the ranks (see the module docstring); the same
    arguments and result, on every rank. One process, or fewer images/captions than ranks: it simply runs
    ``evaluate_retrieval`` (on every rank). A collective: every rank calls it with the same split."""
    rank, world = rank_and_world()
    if score not in SCORES:
        raise UserError(f"eval.score: '{score}' is not one of {', '.join(SCORES)}")
    if max_images < 0:
        raise UserError(f"eval.max_images must be >= 0; got {max_images}")
    if 0 < max_images < split.num_images:
        split = _FirstImages(split, max_images)
    num_images, num_texts = split.num_images, len(split.captions)
    if world == 1 or min(num_images, num_texts) < world:
        return evaluate_retrieval(model, split, transform, k_test, score, batch_size, precision, device,
                                  progress and rank == 0, 0, memory_mb, num_workers)
    target = resolve_device(model, device)
    precision = resolve_precision(precision, target)
    autocast = autocast_context(precision, target)
    txt2img = _as_index_tensor(split.txt2img, num_images, num_texts)
    image_positives = _validate_img2txt(split.img2txt, txt2img, num_images)
    fused = bool(model.has_fusion)
    requested = k_test
    k_test = k_test_for_gallery(k_test, num_images, num_texts, "k_test") if fused else k_test
    image_rows, text_rows = shard_rows(num_images, rank, world), shard_rows(num_texts, rank, world)
    show = progress and rank == 0
    was_training = model.training
    model.eval()
    try:
        images = Subset(split_images(split, transform), image_rows)  # type: ignore[arg-type]
        image_local, image_out = encode_images(model, images, batch_size, num_workers, target, autocast, fused,
                                                show)
        captions = list(split.captions)
        text_local, _ = encode_texts(model, captions[text_rows.start:text_rows.stop], batch_size, target,
                                      autocast, False, show)
        image_emb, text_emb = gather_shards(image_local, num_images), gather_shards(text_local, num_texts)
        txt_local = chunked_ranks(image_local, text_emb, image_positives[image_rows.start:image_rows.stop], memory_mb)
        img_local = chunked_ranks(text_local, image_emb, txt2img[text_rows.start:text_rows.stop, None], memory_mb)
        txt_ranks = gather_shards(txt_local.to(target), num_images).cpu()
        img_ranks = gather_shards(img_local.to(target), num_texts).cpu()
        result: dict[str, Any] = {"itc": recall_metrics(txt_ranks, img_ranks)}
        curves = {"itc": recall_curves(txt_ranks, img_ranks, num_images, num_texts)}
        if fused:
            assert image_out is not None
            itm_txt, itm_img = _rerank_sharded(model, image_out, image_local, text_local, image_emb, text_emb,
                                               captions, image_rows, image_positives, txt2img, txt_local,
                                               img_ranks, k_test, score, batch_size, autocast, memory_mb, show)
            result["itm"] = recall_metrics(itm_txt, itm_img)
            curves["itm"] = recall_curves(itm_txt, itm_img, num_images, num_texts)
        result["curves"] = curves
    finally:
        model.train(was_training)
    result.update(score=score, k_test=k_test, num_images=num_images, num_texts=num_texts, precision=precision)
    if k_test != requested:  # clamped to a small gallery
        result["k_test_requested"] = requested
    return result


def _rerank_sharded(model: Any, image_out: EncoderOutput, image_local: Tensor, text_local: Tensor,
                    image_emb: Tensor, text_emb: Tensor, captions: list[str], image_rows: range,
                    image_positives: Tensor, txt2img: Tensor, txt_local: Tensor, img_ranks: Tensor, k: int,
                    score: str, batch_size: int, autocast: AutocastFactory, memory_mb: float,
                    progress: bool) -> tuple[Tensor, Tensor]:
    """ITM-re-ranked ranks (image queries, text queries) over all queries; see the module docstring."""
    num_texts = len(captions)
    device = image_local.device
    i2t_sims, i2t_top = chunked_topk(image_local, text_emb, k, memory_mb=memory_mb)  # [q_local, k]
    t2i_sims_local, t2i_top_local = chunked_topk(text_local, image_emb, k, memory_mb=memory_mb)
    t2i_sims, t2i_top = gather_shards(t2i_sims_local, num_texts), gather_shards(t2i_top_local, num_texts)
    # This rank scores its images' candidates and every text query's candidates that are its images.
    mine = (t2i_top >= image_rows.start) & (t2i_top < image_rows.stop)  # [N_txt, k]
    t2i_text = mine.nonzero()[:, 0]
    pair_image = torch.cat([torch.arange(len(image_rows), device=device).repeat_interleave(k),
                            t2i_top[mine] - image_rows.start])
    pair_text = torch.cat([i2t_top.reshape(-1), t2i_text])
    needed = torch.unique(pair_text)  # sorted
    _, needed_out = encode_texts(model, [captions[t] for t in needed.tolist()], batch_size, device, autocast,
                                  True, progress)
    assert needed_out is not None
    scores = itm_pair_scores(model, image_out, needed_out, pair_image, torch.searchsorted(needed, pair_text),
                             batch_size, autocast, progress, match=match_rule_for(score)).to(device)
    i2t_scores = scores[:i2t_top.numel()].view_as(i2t_top)
    t2i_scores = torch.zeros_like(t2i_sims)
    t2i_scores[mine] = scores[i2t_top.numel():]
    dist.all_reduce(t2i_scores)  # each entry comes from the one rank that holds its image; the rest add 0
    i2t_scores, t2i_scores = with_itc(score, i2t_scores, i2t_sims, model), with_itc(score, t2i_scores, t2i_sims, model)
    local_positives = image_positives[image_rows.start:image_rows.stop]
    itm_txt_local = reranked_ranks(i2t_top, i2t_scores, local_positives, txt_local)
    itm_txt = gather_shards(itm_txt_local.to(device), len(image_positives)).cpu()
    return itm_txt, reranked_ranks(t2i_top, t2i_scores, txt2img[:, None], img_ranks)


# ------------------------------------------------------------------------------------------ VQA
def vqa_metrics(questions: Sequence[Mapping[str, Any]], predictions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``evaluate_vqa``'s metrics from its predictions (matched to ``questions`` by position)."""
    from vlp.eval.vqa import _human_answers, vqa_accuracy

    scores: list[float] = []
    per_type: dict[str, list[float]] = {}
    for record, prediction in zip(questions, predictions, strict=True):
        humans = _human_answers(record)
        if not humans:
            continue
        value = vqa_accuracy(str(prediction["answer"]), humans)
        scores.append(value)
        if record.get("answer_type"):
            per_type.setdefault(str(record["answer_type"]), []).append(value)

    def percent(values: list[float]) -> float:
        return 100.0 * sum(values) / len(values)

    return {"overall": percent(scores) if scores else None,
            "per_type": {kind: percent(values) for kind, values in sorted(per_type.items())},
            "per_type_count": {kind: len(values) for kind, values in sorted(per_type.items())},
            "num_questions": len(scores)}


def evaluate_vqa_sharded(vqa_model: Any, questions: Sequence[Mapping[str, Any]],
                         load_image: Callable[[Any], Tensor], vocab: Any, batch_size: int = 64,
                         device: str | torch.device | None = None, progress: bool = True,
                         precision: str = DEFAULT_PRECISION,
                         num_workers: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``evaluate_vqa`` with the questions split over the ranks; the same result on every rank (a collective)."""
    from vlp.eval.vqa import evaluate_vqa

    rank, world = rank_and_world()
    if world == 1 or len(questions) < world:
        return evaluate_vqa(vqa_model, questions, load_image, vocab, batch_size, device, progress and rank == 0,
                            precision, num_workers)
    rows = shard_rows(len(questions), rank, world)
    local, _ = evaluate_vqa(vqa_model, questions[rows.start:rows.stop], load_image, vocab, batch_size, device,
                            progress and rank == 0, precision, num_workers)
    predictions = [prediction for part in gather_objects(local) for prediction in part]
    resolved = resolve_precision(precision, resolve_device(vqa_model, device))
    return predictions, {**vqa_metrics(questions, predictions), "precision": resolved}
