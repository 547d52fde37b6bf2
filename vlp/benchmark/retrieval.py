"""Retrieval benchmarks (Flickr30k / COCO Karpathy test splits): the annotation JSON that ALBEF, BLIP and
LAVIS ship, or CLIP_benchmark's webdataset export; ITC, ITM and ITM+ITC columns for fused models.

Every caption of an image is its own text query and any of an image's captions is a hit for the image query
(the 5-captions-per-image protocol of ALBEF/BLIP and CLIP_benchmark). In one process the images and captions
are encoded and the ITC top-k re-scored by ITM once per match rule (``itm`` and ``itm+itc`` share the log-odds
pass); under torchrun ``evaluate_retrieval`` runs once per score.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlp.benchmark.files import BytesImages, read_wds, wds_urls
from vlp.benchmark.scoring import resolved_precision
from vlp.benchmark.suite import RetrievalTask, required_path
from vlp.collectives import rank_and_world
from vlp.config.schema import EvalConfig
from vlp.data.retrieval_split import RetrievalSplit, load_retrieval_split
from vlp.errors import UserError
from vlp.eval.rerank import check_score, match_rule_for, rerank_candidates, reranked_ranks, with_itc
from vlp.eval.retrieval import (
    RetrievalSplitLike,
    _as_index_tensor,
    _validate_img2txt,
    autocast_context,
    chunked_ranks,
    chunked_topk,
    encode_split,
    evaluate_retrieval,
    recall_metrics,
    resolve_device,
)

__all__ = ["WdsRetrievalSplit", "load_retrieval_task", "evaluate_retrieval_task"]


@dataclass
class WdsRetrievalSplit:
    """A CLIP_benchmark retrieval export: one sample per image, its captions one per line in ``txt``."""

    images: list[bytes | None]
    keys: list[str]
    captions: list[str]
    txt2img: list[int]
    img2txt: list[list[int]]

    @property
    def num_images(self) -> int:
        return len(self.images)

    def image_dataset(self, transform: Any) -> BytesImages:
        return BytesImages(self.images, self.keys, transform)


def _load_wds(root: Path, split: str) -> WdsRetrievalSplit:
    kind = (root / "dataset_type.txt").read_text().strip().lower() if (root / "dataset_type.txt").is_file() else ""
    if kind != "retrieval":
        raise UserError(f"{root}: dataset_type.txt must say 'retrieval' (a CLIP_benchmark retrieval export)")
    images: list[bytes | None] = []
    keys: list[str] = []
    captions: list[str] = []
    txt2img: list[int] = []
    img2txt: list[list[int]] = []
    for sample in read_wds(wds_urls(root, split), ["txt"]):
        texts = [" ".join(line.split()) for line in sample.fields["txt"].decode("utf-8").splitlines()]
        texts = [text for text in texts if text]
        if not texts:
            raise UserError(f"{sample.url}: sample '{sample.key}' has no caption")
        img2txt.append(list(range(len(captions), len(captions) + len(texts))))
        txt2img += [len(images)] * len(texts)
        captions += texts
        images.append(sample.image)
        keys.append(sample.key)
    if not images:
        raise UserError(f"{root / split}: no samples")
    return WdsRetrievalSplit(images, keys, captions, txt2img, img2txt)


def load_retrieval_task(name: str, spec: RetrievalTask) -> RetrievalSplit | WdsRetrievalSplit:
    for score in spec.scores:
        check_score(score, f"tasks.{name}.scores")
    if spec.format == "wds":
        return _load_wds(required_path(name, spec, "data", "directory"), spec.split)
    data = required_path(name, spec, "data", "file")
    return load_retrieval_split(data, required_path(name, spec, "image_root", "directory"))


def _columns_one_process(model: Any, split: RetrievalSplitLike, transform: Any, k_test: int, scores: tuple[str, ...],
                         spec: RetrievalTask, device: torch.device, progress: bool) -> dict[str, dict[str, float]]:
    precision = resolved_precision(spec.precision, device)
    autocast = autocast_context(precision, device)
    num_images, num_texts = split.num_images, len(split.captions)
    txt2img = _as_index_tensor(split.txt2img, num_images, num_texts)
    image_positives = _validate_img2txt(split.img2txt, txt2img, num_images)
    encoded = encode_split(model, split, transform, spec.batch_size, precision, device, progress,
                           num_workers=spec.num_workers)
    txt_ranks = chunked_ranks(encoded.image_emb, encoded.text_emb, image_positives)
    img_ranks = chunked_ranks(encoded.text_emb, encoded.image_emb, txt2img[:, None])
    columns = {"itc": recall_metrics(txt_ranks, img_ranks)}
    if model.has_fusion and scores:
        assert encoded.image_out is not None and encoded.text_out is not None
        i2t_sims, i2t_top = chunked_topk(encoded.image_emb, encoded.text_emb, k_test)
        t2i_sims, t2i_top = chunked_topk(encoded.text_emb, encoded.image_emb, k_test)
        matched: dict[str, tuple[Tensor, Tensor]] = {}  # one re-ranking pass per match rule the scores use
        for rule in dict.fromkeys(match_rule_for(score) for score in scores):
            matched[rule] = rerank_candidates(model, encoded.image_out, encoded.text_out, i2t_top, t2i_top,
                                              spec.batch_size, autocast, progress, match=rule)
        for score in scores:
            i2t, t2i = matched[match_rule_for(score)]
            i2t, t2i = with_itc(score, i2t, i2t_sims, model), with_itc(score, t2i, t2i_sims, model)
            columns[score] = recall_metrics(reranked_ranks(i2t_top, i2t, image_positives, txt_ranks),
                                            reranked_ranks(t2i_top, t2i, txt2img[:, None], img_ranks))
    return columns


@torch.no_grad()
def evaluate_retrieval_task(split: RetrievalSplitLike, model: Any, transform: Any, spec: RetrievalTask,
                            device: str | torch.device | None, progress: bool) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics "<score>/<metric>": txt_r1/5/10 = image queries, img_r1/5/10 = text queries, r_mean; protocol)."""
    target = resolve_device(model, device)
    gallery = min(split.num_images, len(split.captions))
    k_test = min(spec.k_test, gallery)
    scores = tuple(spec.scores) if model.has_fusion else ()
    _, world = rank_and_world()
    was_training = model.training
    model.eval()
    try:
        if world == 1:
            columns = _columns_one_process(model, split, transform, k_test, scores, spec, target, progress)
        else:
            columns = {}
            for score in scores or ("itm",):
                config = EvalConfig(k_test=k_test, score=score, batch_size=spec.batch_size, precision=spec.precision)
                result = evaluate_retrieval(model, split, transform, config, device=target, progress=progress,
                                            num_workers=spec.num_workers)
                columns["itc"] = result["itc"]
                if "itm" in result:
                    columns[score] = result["itm"]
    finally:
        model.train(was_training)
    metrics = {f"{column}/{key}": value for column, values in columns.items() for key, value in values.items()}
    protocol = {"num_images": split.num_images, "num_texts": len(split.captions),
                "queries": "every caption is a text query; an image query's hit is any of its captions",
                "scores": ["itc", *scores], "k_test": k_test if scores else None,
                "k_test_asked": spec.k_test, "rerank": "ITM re-scores each query's ITC top k_test" if scores else None}
    return metrics, protocol
