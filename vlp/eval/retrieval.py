"""Image-text retrieval: recall metrics, memory-bounded ranking, and the evaluation harness.

Axis legend: q = queries, g = gallery items, k = candidates per query, p = positives per query,
e = embedding width.
Ranks are 0-based: rank r means r gallery items are ranked above the query's best ground truth.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, NotRequired, Protocol, TypedDict, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from vlp.collectives import gather_no_grad, gather_shards, rank_and_world, shard_rows
from vlp.config.schema import EvalConfig
from vlp.config.validate import k_test_for_gallery
from vlp.errors import UserError
from vlp.eval.rerank import check_score, itm_pair_scores, match_rule_for, reranked_ranks, with_itc
from vlp.eval.topk import budget_elements, chunked_topk
from vlp.models.vlp_model import image_features_of, text_features_of
from vlp.precision import DEFAULT_PRECISION, AutocastFactory, autocast_context, resolve_precision
from vlp.types import EncoderOutput

__all__ = [
    "RetrievalSplitLike", "EncodedSplit", "split_images", "retrieval_metrics", "recall_curves",
    "chunked_topk", "chunked_ranks", "encode_split", "evaluate_retrieval", "fast_precision",
    "autocast_context", "encode_images", "encode_texts",
]

# Anything a DataLoader can index: a torch Dataset or a plain sequence of image tensors.
ImageDataset = Dataset[Any] | Sequence[Any]
RECALL_KS = (1, 5, 10)
CURVE_MAX_K = 50


class RetrievalSplitLike(Protocol):
    """What evaluation needs from a retrieval test split (vlp.data.retrieval_split.RetrievalSplit has it).

    Images come from ``image_dataset(transform)`` (a map-style dataset of image tensors) when the split has
    it, else from ``transform(load_image(i))`` for i < ``num_images``.
    """

    @property
    def num_images(self) -> int: ...
    @property
    def captions(self) -> Sequence[str]: ...
    @property
    def txt2img(self) -> Sequence[int]: ...
    @property
    def img2txt(self) -> Sequence[Sequence[int]]: ...


class _LoadedImages(Dataset[Any]):
    """``transform(load_image(i))`` for i < ``num_images`` (picklable for DataLoader workers)."""

    def __init__(self, load_image: Callable[[int], Any], num_images: int, transform: Any) -> None:
        self.load_image, self.num_images, self.transform = load_image, num_images, transform

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        image = self.load_image(index)
        return image if self.transform is None else self.transform(image)


def split_images(split: Any, transform: Any) -> ImageDataset:
    """A split's images as a dataset: its ``image_dataset(transform)``, else ``load_image(i)``."""
    if hasattr(split, "image_dataset"):
        return split.image_dataset(transform)  # type: ignore[no-any-return]
    if hasattr(split, "load_image"):
        return _LoadedImages(split.load_image, int(split.num_images), transform)
    raise TypeError(f"{type(split).__name__} has neither image_dataset(transform) nor load_image(index)")


# ------------------------------------------------------------------------------------------ ranks / metrics
def positives_from_txt2img(txt2img: Tensor, num_images: int) -> Tensor:
    """[num_images, p] caption indices of each image, padded with -1 (p = most captions of any image)."""
    counts = torch.bincount(txt2img, minlength=num_images)
    order = torch.argsort(txt2img, stable=True)
    sorted_images = txt2img[order]
    slot = torch.arange(len(txt2img)) - (counts.cumsum(0) - counts)[sorted_images]
    positives = torch.full((num_images, max(int(counts.max()), 1)), -1, dtype=torch.long)
    positives[sorted_images, slot] = order
    return positives


def positives_from_lists(lists: Sequence[Sequence[int]]) -> Tensor:
    """[q, p] ground-truth gallery indices per query, padded with -1."""
    width = max((len(row) for row in lists), default=1)
    positives = torch.full((len(lists), max(width, 1)), -1, dtype=torch.long)
    for row, items in enumerate(lists):
        positives[row, : len(items)] = torch.as_tensor(list(items), dtype=torch.long)
    return positives


def ranks_against_positives(scores: Tensor, positives: Tensor) -> Tensor:
    """Rank of each query's best-scoring ground truth. scores [q, g]; positives [q, p] padded with -1.

    Pessimistic ties: every other (non ground-truth) item scoring >= the best ground truth is ranked above it.
    """
    num_gallery = scores.shape[1]
    real = positives >= 0
    best = scores.gather(1, positives.clamp(min=0)).masked_fill(~real, float("-inf")).amax(dim=1)
    # An extra column absorbs the -1 padding so one scatter marks every real positive.
    is_positive = torch.zeros(scores.shape[0], num_gallery + 1, dtype=torch.bool, device=scores.device)
    is_positive.scatter_(1, positives.where(real, num_gallery), True)
    above = (scores >= best[:, None]) & ~is_positive[:, :num_gallery]
    return above.sum(dim=1)


def recall_metrics(txt_ranks: Tensor, img_ranks: Tensor) -> dict[str, float]:
    """txt_r* from image-query ranks, img_r* from text-query ranks, their means and r_mean (percent)."""
    metrics: dict[str, float] = {}
    for side, ranks in (("txt", txt_ranks), ("img", img_ranks)):
        for k in RECALL_KS:
            metrics[f"{side}_r{k}"] = 100.0 * (ranks < k).double().mean().item()
        metrics[f"{side}_r_mean"] = sum(metrics[f"{side}_r{k}"] for k in RECALL_KS) / len(RECALL_KS)
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    return metrics


def _as_index_tensor(txt2img: Sequence[int] | Tensor | np.ndarray, num_images: int, num_texts: int) -> Tensor:
    index = torch.as_tensor(np.asarray(txt2img), dtype=torch.long).reshape(-1)
    if num_images == 0 or num_texts == 0:
        raise UserError(f"retrieval needs images and captions; got {num_images} images, {num_texts} captions")
    if len(index) != num_texts:
        raise UserError(f"txt2img has {len(index)} entries but there are {num_texts} captions")
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= num_images):
        raise UserError(f"txt2img points outside the {num_images} images")
    uncaptioned = (torch.bincount(index, minlength=num_images) == 0).nonzero()
    if len(uncaptioned):
        missing = int(uncaptioned[0])
        raise UserError(f"image {missing} has no ground-truth caption: every image needs at least one")
    return index


def _validate_img2txt(img2txt: Sequence[Sequence[int]], txt2img: Tensor, num_images: int) -> Tensor:
    """img2txt as padded positives [num_images, p], checked to be the inverse of txt2img."""
    derived = positives_from_txt2img(txt2img, num_images)
    given = positives_from_lists(img2txt)
    if given.shape != derived.shape or not torch.equal(given.sort(dim=1).values, derived.sort(dim=1).values):
        raise UserError("img2txt and txt2img disagree: img2txt[i] must list the captions whose txt2img is i")
    return derived


def retrieval_metrics(scores_i2t: Tensor | np.ndarray, txt2img: Sequence[int] | Tensor | np.ndarray,
                      scores_t2i: Tensor | np.ndarray | None = None,
                      img2txt: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
    """Recall@1/5/10 in both directions from full score matrices (percent).

    scores_i2t [N_img, N_txt]; scores_t2i [N_txt, N_img] only when re-ranking made the directions differ
    (ALBEF's itm_eval), else scores_i2t transposed. An image query's rank is its best-ranked caption;
    ties rank pessimistically. ``img2txt`` is derived from ``txt2img`` when not given.
    """
    i2t = torch.as_tensor(np.asarray(scores_i2t)).double()
    if i2t.dim() != 2:
        raise UserError(f"scores_i2t must be [N_img, N_txt]; got shape {tuple(i2t.shape)}")
    num_images, num_texts = i2t.shape
    targets = _as_index_tensor(txt2img, num_images, num_texts)
    positives = (positives_from_txt2img(targets, num_images) if img2txt is None
                 else _validate_img2txt(img2txt, targets, num_images))
    t2i = i2t.T if scores_t2i is None else torch.as_tensor(np.asarray(scores_t2i)).double()
    if tuple(t2i.shape) != (num_texts, num_images):
        raise UserError(f"scores_t2i must be [N_txt, N_img] = {(num_texts, num_images)}; "
                        f"got {tuple(t2i.shape)}")
    txt_ranks = ranks_against_positives(i2t, positives)
    return recall_metrics(txt_ranks, ranks_against_positives(t2i, targets[:, None]))


def recall_curve(ranks: Tensor, max_k: int) -> list[float]:
    """Recall@K in percent for K = 1..max_k."""
    hits = torch.bincount(ranks.clamp(max=max_k).cpu(), minlength=max_k + 1)[:max_k].cumsum(0)
    return (100.0 * hits.double() / max(len(ranks), 1)).tolist()


def recall_curves(txt_ranks: Tensor, img_ranks: Tensor, num_images: int,
                  num_texts: int) -> dict[str, list[float]]:
    """{"txt": recall@K of image queries, "img": recall@K of text queries}, K up to min(50, gallery size)."""
    return {"txt": recall_curve(txt_ranks, min(CURVE_MAX_K, num_texts)),
            "img": recall_curve(img_ranks, min(CURVE_MAX_K, num_images))}


# ------------------------------------------------------------------------------------------ chunked scoring
def chunked_ranks(query_emb: Tensor, gallery_emb: Tensor, positives: Tensor,
                  memory_mb: float = 256) -> Tensor:
    """Pessimistic rank of each query's best ground truth under dot-product scores, in query chunks.

    positives [q, p] (padded with -1). Each chunk's scores are one [chunk, g] block sized to ``memory_mb``
    (at least one full gallery row, which is small: 25k captions are 100 kB).
    """
    chunk = max(1, budget_elements(memory_mb) // max(1, gallery_emb.shape[0]))
    gallery = gallery_emb.float()
    positives = positives.to(query_emb.device)
    ranks = [ranks_against_positives(query_emb[start:start + chunk].float() @ gallery.T,
                                     positives[start:start + chunk])
             for start in range(0, query_emb.shape[0], chunk)]
    return torch.cat(ranks).cpu()


# ------------------------------------------------------------------------------------------ encoding
def fast_precision(device: torch.device) -> str:
    """What ``auto`` resolves to on ``device`` (the older name of ``vlp.precision.resolve_precision("auto", ...)``):
    bf16 on CUDA with bf16 support, fp32 on every CPU."""
    return resolve_precision(DEFAULT_PRECISION, device)


def resolve_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def max_text_length(model: Any) -> int:
    return int(model.config.text.max_length)


def stack_images(items: list[Any]) -> Tensor:
    """Collate a batch of image tensors (or dataset rows holding one under "image")."""
    return torch.stack([item["image"] if isinstance(item, dict) else item for item in items])


def image_loader(dataset: ImageDataset, batch_size: int, num_workers: int,
                 device: torch.device) -> DataLoader[Any]:
    """Batches of image tensors in dataset order."""
    return DataLoader(cast(Dataset[Any], dataset), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=stack_images, pin_memory=device.type == "cuda")


class EncodedSplit(NamedTuple):
    """Embeddings (L2-normalized fp32) and, when kept for fusion, the encoder outputs of a split."""

    image_emb: Tensor
    image_out: EncoderOutput | None
    text_emb: Tensor
    text_out: EncoderOutput | None


@torch.no_grad()
def encode_images(model: Any, dataset: Any, batch_size: int, num_workers: int, device: torch.device,
                   autocast: AutocastFactory, keep: bool, progress: bool) -> tuple[Tensor, EncoderOutput | None]:
    """L2-normalized fp32 embeddings of a dataset's images, in batches, and (``keep``) the encoder outputs;
    without ``keep`` the encoder computes only what the embedding reads."""
    embs, outs = [], []
    for images in tqdm(image_loader(dataset, batch_size, num_workers, device), desc="encode images",
                       disable=not progress):
        with autocast():
            out, emb = image_features_of(model, images.to(device, non_blocking=True), pooled_only=not keep)
        # Cosine similarity is what ITC ranks by, whatever the model returns.
        embs.append(F.normalize(emb.float(), dim=-1))
        if keep:
            outs.append(out)
    return torch.cat(embs), EncoderOutput.cat(outs) if keep else None


@torch.no_grad()
def encode_texts(model: Any, captions: Sequence[str], batch_size: int, device: torch.device,
                  autocast: AutocastFactory, keep: bool, progress: bool) -> tuple[Tensor, EncoderOutput | None]:
    """As ``encode_images`` for captions (tokenized by the model's tokenizer)."""
    embs, outs = [], []
    for start in tqdm(range(0, len(captions), batch_size), desc="encode texts", disable=not progress):
        batch = model.tokenizer(list(captions[start:start + batch_size]), max_length=max_text_length(model))
        with autocast():
            out, emb = text_features_of(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                        pooled_only=not keep)
        embs.append(F.normalize(emb.float(), dim=-1))
        if keep:
            outs.append(out)
    return torch.cat(embs), EncoderOutput.cat(outs) if keep else None


def encode_split(model: Any, split: RetrievalSplitLike, transform: Any, batch_size: int = 128,
                 precision: str = DEFAULT_PRECISION, device: str | torch.device | None = None, progress: bool = True,
                 keep_tokens: bool | None = None, num_workers: int = 0) -> EncodedSplit:
    """Encode every image and caption of a split in batches (tqdm bar, bf16 autocast when ``precision``
    resolves to bf16: see vlp.precision).

    Encoder outputs are kept (on the device) for re-ranking when ``keep_tokens`` (default: when fused).
    """
    target = resolve_device(model, device)
    autocast = autocast_context(precision, target)
    keep = bool(model.has_fusion) if keep_tokens is None else keep_tokens
    image_emb, image_out = encode_images(model, split_images(split, transform), batch_size, num_workers, target,
                                         autocast, keep, progress)
    text_emb, text_out = encode_texts(model, list(split.captions), batch_size, target, autocast, keep, progress)
    return EncodedSplit(image_emb, image_out, text_emb, text_out)


class _FirstImages:
    """The first ``count`` images of a split and their captions (eval.max_images)."""

    def __init__(self, split: RetrievalSplitLike, count: int) -> None:
        self.split = split
        self.num_images = count
        kept = [t for t, image in enumerate(split.txt2img) if image < count]
        self.captions = [split.captions[t] for t in kept]
        self.txt2img = [split.txt2img[t] for t in kept]
        self.img2txt: list[list[int]] = [[] for _ in range(count)]
        for new_index, image in enumerate(self.txt2img):
            self.img2txt[image].append(new_index)

    def image_dataset(self, transform: Any) -> ImageDataset:
        images: Any = split_images(self.split, transform)
        return Subset(images, range(self.num_images))


# ------------------------------------------------------------------------------------------ harness
DEFAULT_EVAL = EvalConfig()


class RetrievalResult(TypedDict):
    """``evaluate_retrieval``'s result, keys in this order (eval_retrieval.json is its JSON)."""

    itc: dict[str, float]
    itm: NotRequired[dict[str, float]]
    curves: dict[str, dict[str, list[float]]]
    score: str
    k_test: int
    num_images: int
    num_texts: int
    precision: str
    k_test_requested: NotRequired[int]


@dataclass(frozen=True)
class _Shards:
    """This rank's contiguous blocks of the images and the captions; one process is world size 1."""

    rank: int
    world: int

    def rows(self, total: int) -> range:
        return shard_rows(total, self.rank, self.world)

    def gather(self, local: Tensor, total: int) -> Tensor:
        return local if self.world == 1 else gather_shards(local, total)

    def gather_output(self, out: EncoderOutput, total: int) -> EncoderOutput:
        """Every rank's encoder outputs, padded to the longest sequence of all ranks."""
        if self.world == 1:
            return out
        length = int(gather_no_grad(torch.tensor([out.tokens.shape[1]], device=out.tokens.device)).max())
        padded = out.padded(length)
        return EncoderOutput(self.gather(padded.tokens, total), self.gather(padded.mask.to(torch.uint8), total).bool(),
                             self.gather(out.pooled, total))


@torch.no_grad()
def evaluate_retrieval(model: Any, split: RetrievalSplitLike, transform: Any,
                       config: EvalConfig = DEFAULT_EVAL, *,
                       device: str | torch.device | None = None, progress: bool = True, memory_mb: float = 1024,
                       num_workers: int = 0) -> RetrievalResult:
    """Retrieval metrics of a model on a split: ITC from the full ranking, plus ITM re-ranking when fused.

    ``config`` gives ``k_test``, ``score``, ``batch_size``, ``max_images`` and ``precision`` (its other
    fields are the trainer's). ITM (ALBEF/BLIP): each query's top ``k_test`` ITC candidates, in both
    directions, are re-scored by the head's log-odds (``score="itm"``; see ``vlp.eval.rerank.MATCH_RULES``),
    by its match logit alone (``"itm_logit"``, as ALBEF and BLIP rank), or by the log-odds plus the ITC
    cosine (``"itm+itc"``, BLIP's sum) or logit (``"itm+itc_logit"``; ``vlp.eval.rerank.with_itc``). Re-scored candidates rank above all others; the others keep their ITC order, so a
    ground truth outside the top k keeps its ITC rank. ``precision`` in the result is what ``auto`` resolved to.

    In a process group this is a collective (every rank passes the same split and gets the same result):
    rank r encodes block r of the images and of the captions, the embeddings and caption outputs are
    gathered, each rank ranks its own queries, and each (image, caption) candidate pair is scored by the rank
    that holds the image, so image tokens never leave their rank. One process is the same path with one
    block; a split with fewer images or captions than ranks is evaluated whole on every rank.
    """
    check_score(config.score, "eval.score")
    if config.max_images < 0:
        raise UserError(f"eval.max_images must be >= 0; got {config.max_images}")
    if 0 < config.max_images < split.num_images:
        split = _FirstImages(split, config.max_images)
    num_images, num_texts = split.num_images, len(split.captions)
    txt2img = _as_index_tensor(split.txt2img, num_images, num_texts)
    image_positives = _validate_img2txt(split.img2txt, txt2img, num_images)
    rank, world = rank_and_world()
    shards = _Shards(rank, world) if min(num_images, num_texts) >= world else _Shards(0, 1)
    target = resolve_device(model, device)
    precision = resolve_precision(config.precision, target)
    fused = bool(model.has_fusion)
    k_test = k_test_for_gallery(config.k_test, num_images, num_texts, "k_test") if fused else config.k_test
    ranking = _Ranking(model, config, autocast_context(precision, target), memory_mb, progress and rank == 0)
    was_training = model.training
    model.eval()
    try:
        images = Subset(split_images(split, transform), shards.rows(num_images))  # type: ignore[arg-type]
        recalls, curves = ranking.run(images, list(split.captions), image_positives, txt2img,
                                      k_test if fused else 0, shards, target, num_workers)
    finally:
        model.train(was_training)
    result = {**recalls, "curves": curves, "score": config.score, "k_test": k_test, "num_images": num_images,
              "num_texts": num_texts, "precision": precision}
    if k_test != config.k_test:  # clamped to a small gallery
        result["k_test_requested"] = config.k_test
    return cast(RetrievalResult, result)


@dataclass
class _Ranking:
    """ITC ranks of every query and, with ``k`` > 0, their ITM re-ranking, over one rank's blocks."""

    model: Any
    config: EvalConfig
    autocast: AutocastFactory
    memory_mb: float
    progress: bool

    def run(self, images: ImageDataset, captions: list[str], image_positives: Tensor, txt2img: Tensor, k: int,
            shards: _Shards, device: torch.device, num_workers: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """({"itc": metrics, "itm": metrics when k > 0}, the matching recall curves)."""
        num_images, num_texts = len(image_positives), len(captions)
        image_rows, text_rows = shards.rows(num_images), shards.rows(num_texts)
        batch_size = self.config.batch_size
        image_local, image_out = encode_images(self.model, images, batch_size, num_workers, device, self.autocast,
                                               k > 0, self.progress)
        text_local, text_out = encode_texts(self.model, captions[text_rows.start:text_rows.stop], batch_size,
                                            device, self.autocast, k > 0, self.progress)
        image_emb, text_emb = shards.gather(image_local, num_images), shards.gather(text_local, num_texts)
        local_positives = image_positives[image_rows.start:image_rows.stop]
        txt_local = chunked_ranks(image_local, text_emb, local_positives, self.memory_mb)
        img_local = chunked_ranks(text_local, image_emb, txt2img[text_rows.start:text_rows.stop, None], self.memory_mb)
        txt_ranks = shards.gather(txt_local.to(device), num_images).cpu()
        img_ranks = shards.gather(img_local.to(device), num_texts).cpu()
        recalls: dict[str, Any] = {"itc": recall_metrics(txt_ranks, img_ranks)}
        curves = {"itc": recall_curves(txt_ranks, img_ranks, num_images, num_texts)}
        if k > 0:
            assert image_out is not None and text_out is not None
            text_all = shards.gather_output(text_out, num_texts)
            i2t_top, i2t_scores, t2i_top, t2i_scores = self._rerank(image_out, image_local, text_local, image_emb,
                                                                    text_emb, text_all, image_rows, shards, k)
            itm_txt_local = reranked_ranks(i2t_top, i2t_scores, local_positives, txt_local)
            itm_txt = shards.gather(itm_txt_local.to(device), num_images).cpu()
            itm_img = reranked_ranks(t2i_top, t2i_scores, txt2img[:, None], img_ranks)
            recalls["itm"] = recall_metrics(itm_txt, itm_img)
            curves["itm"] = recall_curves(itm_txt, itm_img, num_images, num_texts)
        return recalls, curves

    def _rerank(self, image_out: EncoderOutput, image_local: Tensor, text_local: Tensor, image_emb: Tensor,
                text_emb: Tensor, text_all: EncoderOutput, image_rows: range, shards: _Shards,
                k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The candidates and re-scores of this rank's image queries [q_local, k] and of every text query [N_txt, k].

        This rank scores its images' candidate captions and every text query's candidates that are its
        images; the text side's scores are then summed over the ranks (each entry comes from one)."""
        device, num_texts = image_local.device, len(text_emb)
        i2t_sims, i2t_top = chunked_topk(image_local, text_emb, k, memory_mb=self.memory_mb)  # [q_local, k]
        t2i_sims_local, t2i_top_local = chunked_topk(text_local, image_emb, k, memory_mb=self.memory_mb)
        t2i_sims, t2i_top = shards.gather(t2i_sims_local, num_texts), shards.gather(t2i_top_local, num_texts)
        mine = (t2i_top >= image_rows.start) & (t2i_top < image_rows.stop)  # [N_txt, k]
        pair_image = torch.cat([torch.arange(len(image_rows), device=device).repeat_interleave(k),
                                t2i_top[mine] - image_rows.start])
        pair_text = torch.cat([i2t_top.reshape(-1), mine.nonzero()[:, 0]])
        scores = itm_pair_scores(self.model, image_out, text_all, pair_image, pair_text, self.config.batch_size,
                                 self.autocast, self.progress, match=match_rule_for(self.config.score)).to(device)
        i2t_scores = scores[:i2t_top.numel()].view_as(i2t_top)
        t2i_scores = torch.zeros_like(t2i_sims)
        t2i_scores[mine] = scores[i2t_top.numel():]
        if shards.world > 1:
            dist.all_reduce(t2i_scores)
        score = self.config.score
        i2t_scores = with_itc(score, i2t_scores, i2t_sims, self.model)
        t2i_scores = with_itc(score, t2i_scores, t2i_sims, self.model)
        return i2t_top, i2t_scores, t2i_top, t2i_scores
