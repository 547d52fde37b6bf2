"""Zero-shot image classification: prompt-ensemble class embeddings (CLIP), optionally re-ranked by ITM.

Axis legend: c = classes, t = templates, b = images, k = re-ranked classes, e = embedding width.
"""

from __future__ import annotations

from collections.abc import Sequence, Sized
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from tqdm.auto import tqdm

from vlp.errors import UserError
from vlp.eval.rerank import check_score, itm_pair_scores, match_rule_for, reranked_ranks, with_itc
from vlp.eval.retrieval import encode_texts, image_loader, resolve_device, split_images
from vlp.models.vlp_model import image_features_of
from vlp.precision import DEFAULT_PRECISION, AutocastFactory, autocast_context, resolve_precision
from vlp.types import EncoderOutput

__all__ = ["DEFAULT_TEMPLATES", "ZeroShotSplitLike", "ClassPrompts", "default_templates", "zeroshot_classifier",
           "class_prompts", "classify_batch", "evaluate_zeroshot"]

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def default_templates(model: Any, classnames: Sequence[str]) -> list[str]:
    """The prompts of ``vlp eval zeroshot`` and of zero-shot evaluation during training: the synthetic
    captions' phrasing for a synthetic-vocabulary model (other words would be unknown to it), else
    ``DEFAULT_TEMPLATES``."""
    if model.config.text.tokenizer != "synthetic":
        return list(DEFAULT_TEMPLATES)
    from vlp.data.synthetic import COLORS, ZEROSHOT_TEMPLATES

    return list(ZEROSHOT_TEMPLATES["color" if set(classnames) & set(COLORS) else "shape"])


class ZeroShotSplitLike(Protocol):
    """Labelled images: ``labels[i]`` (a class index or class name) is the class of image i. Images come
    from ``image_dataset(transform)`` or ``load_image(i)`` as for retrieval (vlp.data's ZeroShotSplit)."""

    @property
    def labels(self) -> Sequence[int | str]: ...


def _check_prompts(classnames: Sequence[str], templates: Sequence[str]) -> None:
    if not classnames:
        raise UserError("zero-shot classification needs at least one class name")
    if not templates:
        raise UserError("zero-shot classification needs at least one prompt template")
    for template in templates:
        if "{}" not in template:
            raise UserError(f"prompt template '{template}' has no '{{}}' for the class name")


def _encode_prompts(model: Any, prompts: list[str], batch_size: int, device: torch.device, precision: str,
                    keep_tokens: bool) -> tuple[Tensor, EncoderOutput | None]:
    return encode_texts(model, prompts, batch_size, device, autocast_context(precision, device), keep_tokens,
                        progress=False)


@torch.no_grad()
def zeroshot_classifier(model: Any, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                        device: str | torch.device | None = None, batch_size: int = 256,
                        precision: str = DEFAULT_PRECISION) -> Tensor:
    """Class embeddings [c, e]: each class's prompts embedded, normalized, averaged, renormalized (CLIP)."""
    _check_prompts(classnames, templates)
    target = resolve_device(model, device)
    prompts = [template.format(name) for name in classnames for template in templates]
    embs, _ = _encode_prompts(model, prompts, batch_size, target, precision, keep_tokens=False)
    per_template = rearrange(embs, "(c t) e -> c t e", t=len(templates))
    return F.normalize(per_template.mean(dim=1), dim=-1)


def _label_indices(labels: Sequence[int | str], classnames: Sequence[str]) -> Tensor:
    index = {name: i for i, name in enumerate(classnames)}
    resolved = []
    for label in labels:
        if isinstance(label, str):
            if label not in index:
                raise UserError(f"label '{label}' is not in the classes file")
            resolved.append(index[label])
        elif 0 <= int(label) < len(classnames):
            resolved.append(int(label))
        else:
            raise UserError(f"label {label} is outside the {len(classnames)} classes")
    return torch.as_tensor(resolved, dtype=torch.long)


def _accuracy(ranks: Tensor, k: int) -> float:
    return 100.0 * (ranks < k).double().mean().item()


@dataclass
class ClassPrompts:
    """A zero-shot classifier: the class embeddings [c, e] (prompt ensembles) and, for ITM re-scoring, the
    encoder output of each class's first prompt (token states kept); ``rerank_k`` 0 = ITC only."""

    classifier: Tensor
    itm_text: EncoderOutput | None
    rerank_k: int


def class_prompts(model: Any, classnames: Sequence[str], templates: Sequence[str], rerank_k: int,
                  device: torch.device, batch_size: int, precision: str) -> ClassPrompts:
    """Embed the prompts once; ITM pairs an image with its class's first prompt (a fused model only)."""
    rerank_k = min(rerank_k, len(classnames)) if model.has_fusion else 0
    classifier = zeroshot_classifier(model, classnames, templates, device, batch_size, precision)
    itm_text = None
    if rerank_k:
        prompts = [templates[0].format(name) for name in classnames]
        _, itm_text = _encode_prompts(model, prompts, batch_size, device, precision, keep_tokens=True)
    return ClassPrompts(classifier, itm_text, rerank_k)


@torch.no_grad()
def classify_batch(model: Any, images: Tensor, labels: Tensor, classes: ClassPrompts, scores: Sequence[str],
                   batch_size: int, autocast: AutocastFactory) -> tuple[Tensor, Tensor]:
    """One batch of images [b, ...] with their class indices [b]: the (pessimistic) rank of the true class
    and the top-1 class, by ITC and then after re-scoring the top ``rerank_k`` classes by each rule in
    ``scores`` (``RERANK_SCORES``): two [b, 1 + len(scores)] tensors on the CPU (no columns for ``scores``
    when ``classes.rerank_k`` is 0). The one per-batch step of ``evaluate_zeroshot`` and of ``vlp benchmark``.
    """
    target = classes.classifier.device
    itm_text = classes.itm_text if scores else None
    with autocast():
        image_out, emb = image_features_of(model, images.to(target, non_blocking=True),
                                           pooled_only=itm_text is None)
    cosines = F.normalize(emb.float(), dim=-1) @ classes.classifier.T  # [b, c]
    truth = labels.to(target)[:, None]
    # Pessimistic: every other class scoring >= the true class is ranked above it.
    itc_ranks = ((cosines >= cosines.gather(1, truth)).sum(dim=1) - 1).cpu()
    ranks, best = [itc_ranks], [cosines.argmax(dim=1).cpu()]
    if itm_text is not None:
        _, candidates = cosines.topk(classes.rerank_k, dim=1)  # [b, k]
        pair_image = torch.arange(len(labels), device=target).repeat_interleave(classes.rerank_k)
        matches = {rule: itm_pair_scores(model, image_out, itm_text, pair_image, candidates.reshape(-1),
                                         batch_size, autocast, match=rule).view(-1, classes.rerank_k)
                   for rule in dict.fromkeys(match_rule_for(score) for score in scores)}
        for score in scores:
            match = with_itc(score, matches[match_rule_for(score)], cosines.gather(1, candidates), model)
            ranks.append(reranked_ranks(candidates, match, labels.cpu()[:, None], itc_ranks))
            best.append(candidates.gather(1, match.argmax(dim=1, keepdim=True).to(candidates.device))[:, 0].cpu())
    return torch.stack(ranks, dim=1), torch.stack(best, dim=1)


@torch.no_grad()
def evaluate_zeroshot(model: Any, split: ZeroShotSplitLike, transform: Any, classnames: Sequence[str],
                      templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 128,
                      precision: str = DEFAULT_PRECISION, device: str | torch.device | None = None,
                      progress: bool = True,
                      itm_rerank_k: int = 0, num_workers: int = 0, details: bool = False,
                      score: str = "itm") -> dict[str, Any]:
    """Top-1/top-5 zero-shot accuracy (percent) of the ITC classifier; for a fused model with
    ``itm_rerank_k`` > 0 also after re-scoring each image's top-k classes by the ITM head on the class's first
    prompt (re-scored classes rank first; the rest keep their ITC order). ``score`` is one of retrieval's
    re-rank scores (``RERANK_SCORES``): ``itm`` (the head's log-odds), ``itm_logit``, or the log-odds plus the
    class's ITC cosine (``itm+itc``) or ITC logit (``itm+itc_logit``), the cosine being the prompt ensemble's.

    Ties rank pessimistically. Result: {"itc_top1", "itc_top5", ["itm_top1", "itm_top5"], "num_images",
    "num_classes", "itm_rerank_k", "itm_score", "precision"} (``itm_rerank_k`` is 0 when no re-ranking ran: the model has
    no fusion; ``precision`` is what ``auto`` resolved to).
    ``details`` adds "templates" and "itm_prompts" (the prompts used), "per_class" ({class: {"num_images",
    "itc_top1"[, "itm_top1"]}}) and "predictions" ([{"index", "label", "itc"[, "itm"]}], class names; top-1).
    """
    _check_prompts(classnames, templates)
    labels = _label_indices(split.labels, classnames)
    num_classes = len(classnames)
    if model.has_fusion and not 0 <= itm_rerank_k <= num_classes:  # a dual encoder re-scores nothing
        raise UserError(f"itm_rerank_k={itm_rerank_k} must be between 0 and the {num_classes} classes")
    check_score(score, "score")
    target = resolve_device(model, device)
    precision = resolve_precision(precision, target)
    autocast = autocast_context(precision, target)
    was_training = model.training
    model.eval()
    try:
        classes = class_prompts(model, classnames, templates, itm_rerank_k, target, batch_size, precision)
        dataset = split_images(split, transform)
        num_images = len(cast(Sized, dataset))
        if num_images != len(labels) or not num_images:
            raise UserError(f"the zero-shot split has {num_images} images and {len(labels)} labels; "
                            "it needs one label per image and at least one image")
        ranks, best = [], []
        start = 0
        for images in tqdm(image_loader(dataset, batch_size, num_workers, target), desc="zero-shot",
                           disable=not progress):
            batch_ranks, batch_best = classify_batch(model, images, labels[start:start + len(images)], classes,
                                                     (score,), batch_size, autocast)
            start += len(images)
            ranks.append(batch_ranks)
            best.append(batch_best)
    finally:
        model.train(was_training)
    table, top1 = torch.cat(ranks), torch.cat(best)
    rerank_k = classes.rerank_k
    result: dict[str, Any] = {"itc_top1": _accuracy(table[:, 0], 1), "itc_top5": _accuracy(table[:, 0], 5)}
    if rerank_k:
        result.update(itm_top1=_accuracy(table[:, 1], 1), itm_top5=_accuracy(table[:, 1], 5))
    result.update(num_images=start, num_classes=num_classes, itm_rerank_k=rerank_k, itm_score=score,
                  precision=precision)
    if details:
        result.update(_details(classnames, templates, labels[:start], table[:, 0], top1[:, 0],
                               table[:, 1] if rerank_k else None, top1[:, 1] if rerank_k else None))
    return result


def _details(classnames: Sequence[str], templates: Sequence[str], labels: Tensor, itc_ranks: Tensor,
             itc_best: Tensor, itm_ranks: Tensor | None, itm_best: Tensor | None) -> dict[str, Any]:
    """Per-class top-1 accuracy, each image's top-1 class and the prompts, for ``details=True``."""
    per_class: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(classnames):
        rows = labels == index
        entry: dict[str, Any] = {"num_images": int(rows.sum())}
        if entry["num_images"]:
            entry["itc_top1"] = _accuracy(itc_ranks[rows], 1)
            if itm_ranks is not None:
                entry["itm_top1"] = _accuracy(itm_ranks[rows], 1)
        per_class[name] = entry
    predictions = []
    for image, label in enumerate(labels.tolist()):
        row = {"index": image, "label": classnames[label], "itc": classnames[int(itc_best[image])]}
        if itm_best is not None:
            row["itm"] = classnames[int(itm_best[image])]
        predictions.append(row)
    return {"templates": list(templates), "itm_prompts": [templates[0].format(n) for n in classnames]
            if itm_ranks is not None else [], "per_class": per_class, "predictions": predictions}
