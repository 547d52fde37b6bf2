"""Single-process checks of vlp.losses against open_clip, naive loops and statistics."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.loss import SigLipLoss as OpenClipSigLipLoss
from torch import Tensor

from vlp.errors import UserError
from vlp.losses import (
    ContrastiveLoss,
    FeatureQueue,
    SigLipLoss,
    contrastive_loss,
    itm_labels,
    itm_loss,
    mask_tokens,
    mlm_loss,
    sample_hard_negatives,
    siglip_loss,
    soft_cross_entropy,
    soft_targets,
)
from vlp.registry import losses


def _pair(batch: int = 8, dim: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=generator), torch.randn(batch, dim, generator=generator)


# ---------------------------------------------------------------- contrastive (ITC)


def test_contrastive_value_matches_open_clip_on_normalized_inputs() -> None:
    image, text = (F.normalize(x, dim=-1) for x in _pair())
    for scale in (1.0, 14.285, 100.0):
        ours = contrastive_loss(image, text, scale)
        reference = ClipLoss()(image, text, scale)
        assert torch.allclose(ours, reference, atol=1e-6, rtol=1e-6), (scale, ours, reference)


def test_contrastive_gradients_match_open_clip() -> None:
    # Gradients are taken w.r.t. the raw embeddings; open_clip gets them normalized by the caller,
    # as in its models, while contrastive_loss normalizes inside.
    raw_image, raw_text = _pair()
    grads = []
    for use_reference in (False, True):
        image = raw_image.clone().requires_grad_()
        text = raw_text.clone().requires_grad_()
        scale = torch.tensor(14.285, requires_grad=True)
        if use_reference:
            loss = ClipLoss()(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale)
        else:
            loss = contrastive_loss(image, text, scale)
        loss.backward()
        grads.append((loss.detach(), image.grad, text.grad, scale.grad))
    for ours, reference in zip(*grads):
        assert ours is not None and reference is not None
        assert torch.allclose(ours, reference, atol=1e-6, rtol=0)


def test_contrastive_is_log_batch_on_random_embeddings() -> None:
    # At scale 1 each row's loss is log(B) - s_ii + logmeanexp_j(s_ij), with s the cosines of
    # independent random unit vectors in 512 dims (mean 0, std 1/sqrt(512) = 0.044). Averaged over
    # 256 rows the deviation from log(B) has std ~ 0.044 / sqrt(256) = 0.003, so 0.02 is ~7 sigma.
    image, text = _pair(batch=256, dim=512)
    loss = contrastive_loss(image, text, 1.0)
    assert abs(loss.item() - math.log(256)) < 0.02


def test_contrastive_is_zero_on_matched_embeddings() -> None:
    # Orthogonal matched pairs at scale 100: each row's loss is log(1 + (B - 1) e^-100).
    embeddings = torch.eye(8, 16) * 3.0  # unnormalized on purpose
    loss = contrastive_loss(embeddings, embeddings.clone(), 100.0)
    assert loss.item() < 1e-6


def _naive_id_loss(image: Tensor, text: Tensor, scale: float, ids: Tensor) -> float:
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    total = 0.0
    for logits in (scale * image @ text.T, scale * text @ image.T):
        for row in range(len(ids)):
            positives = [col for col in range(len(ids)) if ids[col] == ids[row]]
            log_probs = logits[row].log_softmax(dim=0)
            total += -sum(log_probs[col].item() for col in positives) / len(positives) / len(ids)
    return total / 2


def test_contrastive_with_image_ids() -> None:
    image, text = _pair()
    distinct = contrastive_loss(image, text, 10.0, image_ids=torch.arange(8) * 7)
    assert torch.allclose(distinct, contrastive_loss(image, text, 10.0), atol=1e-6)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    ours = contrastive_loss(image, text, 10.0, image_ids=ids)
    assert ours.item() == pytest.approx(_naive_id_loss(image, text, 10.0, ids), abs=1e-5)


# ---------------------------------------------------------------- SigLIP


def test_siglip_matches_open_clip_value_and_gradients() -> None:
    raw_image, raw_text = _pair()
    results = []
    for use_reference in (False, True):
        image = raw_image.clone().requires_grad_()
        text = raw_text.clone().requires_grad_()
        scale = torch.tensor(10.0, requires_grad=True)
        bias = torch.tensor(-10.0, requires_grad=True)
        if use_reference:
            loss = OpenClipSigLipLoss()(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale, bias)
        else:
            loss = siglip_loss(image, text, scale, bias)
        loss.backward()
        results.append((loss.detach(), image.grad, text.grad, scale.grad, bias.grad))
    for ours, reference in zip(*results):
        assert ours is not None and reference is not None
        assert torch.allclose(ours, reference, atol=1e-6, rtol=0)


def test_siglip_with_image_ids() -> None:
    image, text = _pair()
    assert torch.allclose(siglip_loss(image, text, 10.0, -10.0, image_ids=torch.arange(8)), siglip_loss(image, text, 10.0, -10.0))
    ids = torch.tensor([0, 0, 1, 1, 2, 3, 4, 5])
    logits = 10.0 * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T - 10.0
    labels = torch.where(ids[:, None] == ids[None, :], 1.0, -1.0)
    naive = sum(-math.log(torch.sigmoid(labels[i, j] * logits[i, j]).item()) for i in range(8) for j in range(8)) / 8
    assert siglip_loss(image, text, 10.0, -10.0, image_ids=ids).item() == pytest.approx(naive, rel=1e-5)


# ---------------------------------------------------------------- fp32 under autocast


def test_losses_are_fp32_under_bf16_autocast() -> None:
    image, text = _pair(batch=8, dim=32)
    projection = torch.nn.Linear(32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image_emb, text_emb = projection(image), projection(text)
        assert image_emb.dtype == torch.bfloat16
        itc = contrastive_loss(image_emb, text_emb, 20.0)
        sig = siglip_loss(image_emb, text_emb, 10.0, -10.0)
        itm = itm_loss(image_emb[:, :2], itm_labels(8)[:8])
        mlm = mlm_loss(image_emb.unsqueeze(0), torch.arange(8).unsqueeze(0))
        soft = soft_cross_entropy(image_emb, soft_targets(text_emb, 0.4, torch.eye(8, 32)))
    for loss in (itc, sig, itm, mlm, soft):
        assert loss.dtype == torch.float32
    # Same value as an fp32 computation on the bf16 embeddings: the loss itself was not in bf16.
    assert torch.allclose(itc, contrastive_loss(image_emb.float(), text_emb.float(), 20.0), atol=1e-6)
    assert torch.allclose(sig, siglip_loss(image_emb.float(), text_emb.float(), 10.0, -10.0), atol=1e-6)


# ---------------------------------------------------------------- loss modules, temperature


def test_contrastive_module_scale_clamp_open_clip_range() -> None:
    module = ContrastiveLoss()
    assert module.logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        module.log_scale.fill_(10.0)  # e^10 ~ 22026, far above the cap
    assert module.logit_scale().item() == pytest.approx(100.0, rel=1e-6)
    assert module.log_scale.item() == pytest.approx(math.log(100.0), rel=1e-6)
    image, text = _pair()
    out = module(image, text)
    out.total.backward()
    # The clamp rewrites the stored value, so the optimizer still sees a gradient at the bound.
    assert module.log_scale.grad is not None and module.log_scale.grad.abs().item() > 0
    assert out.terms["temperature"].item() == pytest.approx(0.01, rel=1e-6)
    assert torch.allclose(out.terms["itc"], contrastive_loss(image, text, 100.0))


def test_contrastive_module_albef_range() -> None:
    module = ContrastiveLoss(temperature=0.07, temperature_min=0.001, temperature_max=0.5)
    with torch.no_grad():
        module.log_scale.fill_(-5.0)
    assert module.logit_scale().item() == pytest.approx(2.0, rel=1e-6)  # temperature 0.5
    with torch.no_grad():
        module.log_scale.fill_(20.0)
    assert module.logit_scale().item() == pytest.approx(1000.0, rel=1e-5)  # temperature 0.001


def test_fixed_temperature_and_bad_values() -> None:
    module = ContrastiveLoss(temperature=0.05, learnable=False)
    assert list(module.parameters()) == []
    assert module.logit_scale().item() == pytest.approx(20.0, rel=1e-6)
    with pytest.raises(UserError, match="temperature"):
        ContrastiveLoss(temperature=0.0)
    with pytest.raises(UserError, match="temperature_max"):
        ContrastiveLoss(temperature=0.7, temperature_max=0.5)


def test_siglip_module_init_and_registry() -> None:
    module = SigLipLoss()
    assert module.logit_scale().item() == pytest.approx(10.0, rel=1e-6)
    assert module.logit_bias().item() == -10.0
    image, text = _pair()
    out = module(image, text)
    assert torch.allclose(out.total, siglip_loss(image, text, 10.0, -10.0))
    assert set(out.terms) == {"siglip", "temperature", "bias"}
    out.total.backward()
    assert module.bias.grad is not None and module.log_scale.grad is not None


def test_losses_registry_holds_functions_of_the_embeddings_scale_and_bias() -> None:
    image, text = _pair()
    ids = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6][: image.shape[0]])
    assert losses.names() == ["itc", "siglip"]
    assert torch.equal(losses.get("itc")(image, text, 14.0, image_ids=ids), contrastive_loss(image, text, 14.0, image_ids=ids))
    assert torch.equal(losses.get("siglip")(image, text, 10.0, torch.tensor(-10.0), image_ids=ids),
                       siglip_loss(image, text, 10.0, -10.0, image_ids=ids))
    with pytest.raises(ValueError, match="takes no logit bias"):
        losses.get("itc")(image, text, 14.0, torch.tensor(0.0))
    with pytest.raises(ValueError, match="needs the model's logit bias"):
        losses.get("siglip")(image, text, 10.0)


@pytest.mark.parametrize("contrastive", ["itc", "siglip"])
def test_model_owns_its_logit_scale_and_bias_under_the_old_state_dict_keys(contrastive: str) -> None:
    from vlp.config.io import from_dict
    from vlp.config.schema import ModelConfig
    from vlp.layers.logit_scale import LogitScale
    from vlp.models import build_model

    model = build_model(from_dict(ModelConfig, {
        "contrastive": contrastive, "temperature": 0.07, "siglip_bias": -10.0, "embed_dim": 16,
        "image": {"image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "num_heads": 2},
        "text": {"tokenizer": "synthetic", "width": 32, "depth": 1, "num_heads": 2}, "fusion": {"type": "none"}}))
    assert isinstance(model.temperature, LogitScale) and model.contrastive == contrastive
    keys = {k for k in model.state_dict() if k.startswith("temperature.")}
    assert keys == ({"temperature.log_scale", "temperature.bias"} if contrastive == "siglip"
                    else {"temperature.log_scale"})
    assert model.logit_scale().item() == pytest.approx(1 / 0.07)
    bias = model.logit_bias()
    assert (bias is None) == (contrastive == "itc")
    if bias is not None:
        assert bias.item() == -10.0


# ---------------------------------------------------------------- ITM


def _counts(sim: Tensor, draws: int, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """How often each column was drawn per row as negative text and as negative image (same similarities)."""
    generator = torch.Generator().manual_seed(1)
    rows, columns = sim.shape
    text_counts = torch.zeros(rows, columns)
    image_counts = torch.zeros(rows, columns)
    row_index = torch.arange(rows)
    for _ in range(draws):
        neg_text, neg_image = sample_hard_negatives(sim, sim.clone(), generator=generator, **kwargs)
        text_counts[row_index, neg_text] += 1
        image_counts[row_index, neg_image] += 1
    return text_counts, image_counts


def test_hard_negatives_never_positive_nor_same_image() -> None:
    sim = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.tensor([0, 0, 1, 1, 2, 3])
    for hard in (True, False):
        text_counts, image_counts = _counts(sim, 2000, image_ids=ids, hard=hard)
        forbidden = ids[:, None] == ids[None, :]  # includes the diagonal
        assert text_counts[forbidden].sum() == 0 and image_counts[forbidden].sum() == 0
        assert text_counts.sum() == 2000 * 6


def test_hard_negatives_with_gathered_columns() -> None:
    # This rank holds rows 4..7 of a gathered batch of 12 columns.
    sim = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
    text_counts, image_counts = _counts(sim, 500, row_offset=4)
    positives = torch.arange(4), torch.arange(4) + 4
    assert text_counts[positives].sum() == 0 and image_counts[positives].sum() == 0
    assert (text_counts.sum(dim=0) > 0).sum() == 12  # every other column gets drawn


def test_hard_negatives_follow_softmax_of_similarity() -> None:
    sim = torch.tensor([[0.0, 2.0, 1.0, -1.0], [2.0, 0.0, 0.0, -2.0], [1.0, 0.5, 0.0, 0.2], [-1.0, 0.0, 3.0, 0.0]])
    draws = 2000
    text_counts, _ = _counts(sim, draws, hard=True)
    expected = sim.masked_fill(torch.eye(4, dtype=torch.bool), float("-inf")).softmax(dim=1)
    # Binomial std <= sqrt(0.25 / 2000) = 0.011 per cell; 0.04 is > 3.5 sigma.
    assert (text_counts / draws - expected).abs().max() < 0.04
    assert text_counts[0, 1] > 3 * text_counts[0, 3]  # similarity 2 vs -1 in row 0
    uniform, _ = _counts(sim, draws, hard=False)
    assert (uniform / draws - (1 - torch.eye(4)) / 3).abs().max() < 0.04


def test_hard_negatives_reject_rows_without_negative() -> None:
    sim = torch.randn(3, 3)
    with pytest.raises(ValueError, match="no valid ITM negative"):
        sample_hard_negatives(sim, sim, image_ids=torch.tensor([5, 5, 5]))


def test_itm_labels_and_loss() -> None:
    assert itm_labels(3).tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    logits = torch.randn(9, 2, requires_grad=True)
    labels = itm_labels(3)
    assert torch.allclose(itm_loss(logits, labels), F.cross_entropy(logits, labels))
    with pytest.raises(ValueError):
        itm_loss(torch.randn(9, 3), labels)


# ---------------------------------------------------------------- MLM

SPECIAL = {0, 1, 2, 3}  # pad, cls, sep, mask
MASK_ID, VOCAB = 3, 1000


def _token_batch(batch: int = 128, length: int = 128) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (batch, length), generator=generator)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
    positions = torch.arange(length)
    mask = positions[None, :] < lengths[:, None]
    ids[:, 0] = 1
    ids[torch.arange(batch), lengths - 1] = 2
    ids[~mask] = 0
    return ids, mask


def test_mask_tokens_selection_and_split() -> None:
    ids, attention = _token_batch()
    masked, labels = mask_tokens(ids, attention.long(), MASK_ID, SPECIAL, VOCAB, generator=torch.Generator().manual_seed(3))
    selected = labels != -100
    candidates = attention & ~torch.isin(ids, torch.tensor(sorted(SPECIAL)))
    assert not (selected & ~candidates).any()  # never special tokens or padding
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    # ~14k candidates: the selection rate's std is ~0.003, the split's std among ~2k selected ~0.009.
    assert selected.sum() / candidates.sum() == pytest.approx(0.15, abs=0.012)
    count = selected.sum()
    to_mask = (masked == MASK_ID) & selected
    changed = (masked != ids) & ~to_mask
    assert to_mask.sum() / count == pytest.approx(0.8, abs=0.035)
    assert changed.sum() / count == pytest.approx(0.1, abs=0.03)  # a random draw may equal the original
    assert (selected & (masked == ids)).sum() / count == pytest.approx(0.1, abs=0.03)
    assert not torch.isin(masked[changed], torch.tensor(sorted(SPECIAL))).any()
    again, _ = mask_tokens(ids, attention, MASK_ID, SPECIAL, VOCAB, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, masked)


def test_mlm_loss_on_selected_positions() -> None:
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.tensor([[-100, 3, -100, 7, -100], [1, -100, -100, -100, 10]])
    reference = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(mlm_loss(logits, labels), reference)
    empty = mlm_loss(logits, torch.full((2, 5), -100))
    assert empty.item() == 0.0
    empty.backward()
    assert logits.grad is not None and logits.grad.abs().sum() == 0
    with pytest.raises(ValueError):
        mlm_loss(logits, labels[:, :4])


# ---------------------------------------------------------------- distillation, queue


def test_soft_targets_and_cross_entropy() -> None:
    sim = torch.randn(4, 6)
    hard = torch.eye(4, 6)
    targets = soft_targets(sim, 0.4, hard)
    assert torch.allclose(targets, 0.4 * sim.softmax(dim=1) + 0.6 * hard)
    assert torch.allclose(targets.sum(dim=1), torch.ones(4))
    assert torch.equal(soft_targets(sim, 0.0, hard), hard)
    logits = torch.randn(4, 6)
    assert torch.allclose(soft_cross_entropy(logits, hard), F.cross_entropy(logits, torch.arange(4)))


def test_feature_queue_wraps_around() -> None:
    queue = FeatureQueue(dim=4, size=5)
    image, text, ids = queue.features()
    assert image.shape == (5, 4) and torch.allclose(image.norm(dim=1), torch.ones(5))
    assert torch.allclose(text.norm(dim=1), torch.ones(5)) and (ids == -100).all()
    assert set(queue.state_dict()) == {"image_queue", "text_queue", "idx_queue", "ptr"}

    def batch(first: int, count: int) -> tuple[Tensor, Tensor, Tensor]:
        values = torch.arange(first, first + count, dtype=torch.float)[:, None].expand(count, 4)
        return values, -values, torch.arange(first, first + count)

    queue.enqueue(*batch(10, 3))
    queue.enqueue(*batch(20, 3))  # slots 3, 4, then wraps to 0
    image, text, ids = queue.features()
    assert ids.tolist() == [22, 11, 12, 20, 21]
    assert image[:, 0].tolist() == [22, 11, 12, 20, 21] and text[:, 3].tolist() == [-22, -11, -12, -20, -21]
    assert queue.ptr.item() == 1
    image[0] = 0.0  # features() returns copies
    assert queue.image_queue[0, 0].item() == 22

    queue.enqueue(*batch(30, 7))  # longer than the queue: the newest five stay, the oldest slot comes next
    _, _, ids = queue.features()
    assert sorted(ids.tolist()) == [32, 33, 34, 35, 36]
    assert ids[int(queue.ptr.item())].item() == 32
