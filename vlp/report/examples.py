"""Retrieval examples for the run report: text queries -> top images, image queries -> top captions (ITC)."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from vlp.models.vlp_model import VLPModel

__all__ = ["RetrievalExamples", "Query", "Hit", "retrieval_examples", "png_data_uri"]

_THUMB = 96  # px: the largest side of an image thumbnail as stored in the page


def png_data_uri(image: Image.Image, max_side: int = _THUMB) -> str:
    """A PNG data URI of ``image``, shrunk (never enlarged) to ``max_side`` px."""
    thumb = image.convert("RGB")
    thumb.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class Hit:
    """One ranked result: its gallery index (image or caption), what to show (a thumbnail data URI or the
    caption), its cosine similarity to the query and whether it is a ground-truth match."""

    index: int
    shown: str
    score: float
    correct: bool


@dataclass
class Query:
    index: int  # the query caption's or image's index in the gallery
    shown: str  # the caption, or the image as a data URI
    hits: list[Hit]


@dataclass
class RetrievalExamples:
    """Text queries -> top images and image queries -> top captions, over a gallery of ``num_images``
    images and ``num_texts`` captions."""

    text_queries: list[Query]
    image_queries: list[Query]
    num_images: int
    num_texts: int


def _spread(count: int, total: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (deterministic, so reports are comparable)."""
    count = min(count, total)
    return [round(k * (total - 1) / max(count - 1, 1)) for k in range(count)] if count else []


@torch.no_grad()
def _embed(model: VLPModel, split: Any, device: torch.device, batch_size: int = 64) -> tuple[Tensor, Tensor]:
    transform = model.image_transform(train=False)
    image_emb = [model.encode_image(torch.stack([transform(split.load_image(i))
                                                 for i in range(start, min(start + batch_size, split.num_images))])
                                    .to(device))
                 for start in range(0, split.num_images, batch_size)]
    text_emb = []
    for start in range(0, len(split.captions), batch_size):
        batch = model.tokenizer(split.captions[start:start + batch_size], model.config.text.max_length)
        text_emb.append(model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device)))
    return torch.cat(image_emb).cpu(), torch.cat(text_emb).cpu()


def retrieval_examples(model: VLPModel, split: Any, num_images: int = 100, text_queries: int = 8,
                       image_queries: int = 4, top_k: int = 5) -> RetrievalExamples:
    """Rank the first ``num_images`` images of ``split`` (a RetrievalSplit) and their captions by ITC cosine
    similarity; queries are spread evenly over the gallery, the top ``top_k`` results are kept."""
    gallery = split.first(num_images)
    device = model.device()
    was_training = model.training
    model.eval()
    try:
        image_emb, text_emb = _embed(model, gallery, device)
    finally:
        model.train(was_training)
    similarity = image_emb @ text_emb.T  # images x texts, both L2-normalized
    thumbs: dict[int, str] = {}

    def thumb(index: int) -> str:
        if index not in thumbs:
            thumbs[index] = png_data_uri(gallery.load_image(index))
        return thumbs[index]

    by_text = []
    for image_index in _spread(text_queries, gallery.num_images):
        text = gallery.img2txt[image_index][0]
        scores, order = similarity[:, text].topk(min(top_k, gallery.num_images))
        by_text.append(Query(text, gallery.captions[text], [Hit(int(i), thumb(int(i)), float(s), int(i) == image_index)
                                                            for s, i in zip(scores, order)]))
    by_image = []
    for image_index in _spread(image_queries, gallery.num_images):
        scores, order = similarity[image_index].topk(min(top_k, len(gallery.captions)))
        by_image.append(Query(image_index, thumb(image_index),
                              [Hit(int(t), gallery.captions[int(t)], float(s), gallery.txt2img[int(t)] == image_index)
                               for s, t in zip(scores, order)]))
    return RetrievalExamples(by_text, by_image, gallery.num_images, len(gallery.captions))
