"""ITM re-ranking of retrieval candidates, batched across (text, image) pairs.

All pairs of both directions are grouped by image, so each image's fusion context (its fusion-width
tokens and cached cross-attention keys/values) is built once and indexed by every pair that uses it.

Encoder outputs enter the model in its own parameter dtype: outputs encoded under bf16 autocast (bf16
tokens) re-rank with an fp32 model, and fp32 outputs with a bf16 one, whatever the re-ranking precision.

Axis legend: q = queries, k = candidates per query, p = ground truths per query, n = pairs.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vlp.config.schema import RERANK_SCORES
from vlp.errors import UserError
from vlp.precision import DEFAULT_PRECISION, AutocastFactory, autocast_context
from vlp.types import EncoderOutput

__all__ = ["FusedRetrievalModel", "MATCH_RULES", "match_scores", "match_rule_for", "with_itc", "check_score",
           "itm_pair_scores", "rerank_candidates", "reranked_ranks"]

# How an ITM head's two logits [n, 2] become one match score per pair:
# - log_odds (vlp's default): logit 1 - logit 0, the head's log p(match) / p(no match). The cross-entropy
#   the head is trained with depends on that difference only, so it is everything the head learned.
# - logit: column 1 alone, as ALBEF's and BLIP's retrieval code ranks. Its other half, (logit 1 + logit 0) / 2,
#   receives no gradient from the loss: it stays a random projection of the fused state from
#   initialization and adds pair-dependent noise to the ranking.
MATCH_RULES = ("log_odds", "logit")


def match_scores(logits: Tensor, rule: str = "log_odds") -> Tensor:
    """One fp32 match score per pair from ITM logits [n, 2] (column 1 = match) under ``rule`` (``MATCH_RULES``)."""
    if rule == "log_odds":
        return (logits[:, 1] - logits[:, 0]).float()
    if rule == "logit":
        return logits[:, 1].float()
    raise ValueError(f"unknown match rule {rule!r}; expected one of {', '.join(MATCH_RULES)}")


def match_rule_for(score: str) -> str:
    """The match rule of a retrieval re-rank score: ``itm_logit`` ranks by ALBEF/BLIP's column-1 logit,
    ``itm`` and ``itm+itc`` by the log-odds."""
    return "logit" if score == "itm_logit" else "log_odds"


def check_score(score: str, where: str) -> None:
    """One error line when ``score`` is not a re-rank score (``RERANK_SCORES``); ``where`` names its key."""
    if score not in RERANK_SCORES:
        raise UserError(f"{where}: '{score}' is not one of {', '.join(RERANK_SCORES)}")


def with_itc(score: str, itm: Tensor, cosine: Tensor, model: Any) -> Tensor:
    """A re-rank score from the candidates' ITM scores and their ITC cosines (same shape):
    ``itm`` / ``itm_logit``: the ITM score alone; ``itm+itc``: plus the cosine (BLIP's sum);
    ``itm+itc_logit``: plus the ITC logit, logit scale x cosine. Each term is then a log-likelihood of its
    head (the match log-odds; the contrastive log-softmax up to a per-query constant), so their sum ranks by
    both heads' evidence, where the raw cosine is tiny beside a logit. It does not guarantee a ranking at or
    above ITC: a match head that is confidently wrong still pulls it down."""
    if score == "itm+itc":
        return itm + cosine
    if score == "itm+itc_logit":
        return itm + float(model.logit_scale().detach()) * cosine
    return itm


class FusedRetrievalModel(Protocol):
    """The two model methods re-ranking uses (VLPModel implements them)."""

    def image_context(self, image_out: EncoderOutput) -> Any: ...
    def itm_logits_from(self, text_out: EncoderOutput, context: Any, index: Tensor) -> Tensor: ...


def select_rows(out: EncoderOutput, rows: Tensor) -> EncoderOutput:
    """Rows of an encoder output, with columns that are padding in every selected row dropped."""
    mask = out.mask[rows]
    # Fusion outputs do not depend on padding, so a batch of short captions need not carry the longest one's.
    length = int(mask.any(dim=0).nonzero().max()) + 1 if bool(mask.any()) else mask.shape[1]
    return EncoderOutput(out.tokens[rows, :length], mask[:, :length], out.pooled[rows])


def parameter_dtype(model: Any) -> torch.dtype | None:
    """The dtype of a model's first floating-point parameter (None: no parameters to tell)."""
    parameters = getattr(model, "parameters", None)
    if not callable(parameters):
        return None
    return next((p.dtype for p in parameters() if p.is_floating_point()), None)


def as_dtype(out: EncoderOutput, dtype: torch.dtype | None) -> EncoderOutput:
    """Floating tokens and pooled rows in ``dtype`` (unchanged when None or already so); the mask stays."""
    def cast(tensor: Tensor) -> Tensor:
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

    return EncoderOutput(cast(out.tokens), out.mask, cast(out.pooled))


def autocast_for(precision: str | AutocastFactory, device: torch.device) -> AutocastFactory:
    """A precision name resolved on ``device``, or an autocast factory a caller already built."""
    return autocast_context(precision, device) if isinstance(precision, str) else precision


@torch.no_grad()
def itm_pair_scores(model: FusedRetrievalModel, image_out: EncoderOutput, text_out: EncoderOutput,
                    pair_image: Tensor, pair_text: Tensor, batch_size: int = 128,
                    precision: str | AutocastFactory = DEFAULT_PRECISION, progress: bool = False,
                    image_chunk: int | None = None, match: str = "log_odds") -> Tensor:
    """Match scores (fp32, ``match_scores`` under rule ``match``) of the pairs (image ``pair_image[n]``, text
    ``pair_text[n]``).

    image_out / text_out: encoder outputs of the whole gallery / caption set, in any floating dtype (cast to
    the model's parameter dtype as they enter it). ``precision``: auto, fp32 or bf16 (resolved on the
    outputs' device, see vlp.precision), or an autocast factory. Images are processed in chunks of
    ``image_chunk`` (default ``batch_size``); a chunk's pairs are scored ``batch_size`` at a time.
    """
    num_pairs = pair_image.shape[0]
    num_images = image_out.tokens.shape[0]
    chunk = image_chunk or batch_size
    device = image_out.tokens.device
    autocast = autocast_for(precision, device)
    dtype = parameter_dtype(model)
    pair_image, pair_text = pair_image.to(device), pair_text.to(device)
    order = torch.argsort(pair_image, stable=True)
    chunk_starts = torch.arange(0, num_images + chunk, chunk, device=device).clamp(max=num_images)
    bounds = torch.searchsorted(pair_image[order], chunk_starts).tolist()
    scores = torch.empty(num_pairs, dtype=torch.float32, device=device)
    with tqdm(total=num_pairs, desc="itm re-rank", disable=not progress) as bar:
        for c, image_start in enumerate(range(0, num_images, chunk)):
            low, high = bounds[c], bounds[c + 1]
            if low == high:
                continue
            with autocast():
                context = model.image_context(as_dtype(image_out.select(slice(image_start, image_start + chunk)),
                                                       dtype))
            for start in range(low, high, batch_size):
                pairs = order[start:min(start + batch_size, high)]
                with autocast():
                    logits = model.itm_logits_from(as_dtype(select_rows(text_out, pair_text[pairs]), dtype),
                                                   context, pair_image[pairs] - image_start)
                scores[pairs] = match_scores(logits, match)
                bar.update(len(pairs))
    return scores


def rerank_candidates(model: FusedRetrievalModel, image_out: EncoderOutput, text_out: EncoderOutput,
                      i2t_candidates: Tensor, t2i_candidates: Tensor, batch_size: int = 128,
                      precision: str | AutocastFactory = DEFAULT_PRECISION,
                      progress: bool = False, match: str = "log_odds") -> tuple[Tensor, Tensor]:
    """Match scores (rule ``match``) of each image's candidate captions [N_img, k] and each caption's
    candidate images [N_txt, k].

    Both directions share one pass over the images, so each image context is built once. ``precision`` and
    the encoder outputs' dtypes are as for ``itm_pair_scores``.
    """
    num_images, k_i2t = i2t_candidates.shape
    num_texts, k_t2i = t2i_candidates.shape
    device = i2t_candidates.device
    pair_image = torch.cat([torch.arange(num_images, device=device).repeat_interleave(k_i2t),
                            t2i_candidates.reshape(-1).to(device)])
    pair_text = torch.cat([i2t_candidates.reshape(-1),
                           torch.arange(num_texts, device=device).repeat_interleave(k_t2i)])
    scores = itm_pair_scores(model, image_out, text_out, pair_image, pair_text, batch_size, precision,
                             progress, match=match)
    scores = scores.to(device)
    i2t_scores, t2i_scores = scores.split([num_images * k_i2t, num_texts * k_t2i])
    return i2t_scores.view(num_images, k_i2t), t2i_scores.view(num_texts, k_t2i)


def reranked_ranks(candidates: Tensor, scores: Tensor, positives: Tensor, fallback_ranks: Tensor) -> Tensor:
    """Pessimistic rank of each query's best ground truth after re-ranking its candidates.

    candidates [q, k] gallery indices with their new scores [q, k]; positives [q, p] (padded with -1).
    Re-scored candidates rank above every other item and the rest keep their ITC order, so a query whose
    ground truths all lie outside its candidates keeps its ITC rank (``fallback_ranks`` [q]).
    """
    candidates, scores = candidates.cpu(), scores.cpu().double()
    positives, fallback_ranks = positives.cpu(), fallback_ranks.cpu()
    real = positives[:, None, :] >= 0
    is_positive = ((candidates[:, :, None] == positives[:, None, :]) & real).any(dim=-1)  # [q, k]
    best = scores.masked_fill(~is_positive, float("-inf")).amax(dim=1)
    above = ((scores >= best[:, None]) & ~is_positive).sum(dim=1)
    return torch.where(is_positive.any(dim=1), above, fallback_ranks)
