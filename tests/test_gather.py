"""Two CPU processes (gloo) against one process on the concatenated batch.

The "model" is a pair of linear projections with a log logit scale and a SigLIP bias. Each rank
runs forward and backward on its half of the batch; averaging the per-rank parameter gradients
(what DDP does) must give the single-process gradient of the whole batch. Contrastive global loss:
same value on every rank. Local loss and SigLIP: each rank holds its share and the mean over ranks
is the single-process value.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from open_clip.tokenizer import canonicalize_text
from torch import Tensor, nn

from vlp.collectives import gather_no_grad, gather_with_grad, rank_and_world
from vlp.losses import (
    contrastive_loss,
    draw_negatives,
    sample_hard_negatives,
    siglip_loss,
    text_keys,
)

WORLD, BATCH = 2, 4  # per-rank batch; global batch 8
# captions repeated within and across ranks, up to case and punctuation
CAPTIONS = ["logo", "a dog", "Image.", "two cats", "a red car", "LOGO", "image", "a dog!"]
IMAGE_IN, TEXT_IN, EMBED = 12, 10, 8
IDS = torch.tensor([0, 1, 2, 3, 3, 4, 0, 5])  # image ids shared within and across ranks

def _caption_keys(captions: list[str]) -> Tensor:
    vocabulary = sorted({canonicalize_text(c) for c in CAPTIONS})  # one word id per distinct text, in every process
    ids = torch.tensor([[1, vocabulary.index(canonicalize_text(c)) + 3, 2] for c in captions])
    return text_keys(ids, torch.ones_like(ids, dtype=torch.bool), captions)


pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")


class _Towers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(IMAGE_IN, EMBED)
        self.text = nn.Linear(TEXT_IN, EMBED)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-5.0))


def _data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * BATCH, IMAGE_IN, generator=generator), torch.randn(WORLD * BATCH, TEXT_IN, generator=generator)


LossFn = Callable[[_Towers, Tensor, Tensor, Tensor], Tensor]


def _contrastive(local_loss: bool, with_ids: bool) -> LossFn:
    def loss(model: _Towers, images: Tensor, texts: Tensor, ids: Tensor) -> Tensor:
        return contrastive_loss(
            model.image(images), model.text(texts), model.log_scale.exp(),
            local_loss=local_loss, image_ids=ids if with_ids else None,
        )

    return loss


def _siglip(with_ids: bool) -> LossFn:
    def loss(model: _Towers, images: Tensor, texts: Tensor, ids: Tensor) -> Tensor:
        return siglip_loss(
            model.image(images), model.text(texts), model.log_scale.exp(), model.bias,
            image_ids=ids if with_ids else None,
        )

    return loss


CASES: dict[str, LossFn] = {
    "global": _contrastive(local_loss=False, with_ids=False),
    "global_ids": _contrastive(local_loss=False, with_ids=True),
    "local": _contrastive(local_loss=True, with_ids=False),
    "local_ids": _contrastive(local_loss=True, with_ids=True),
    "siglip": _siglip(with_ids=False),
    "siglip_ids": _siglip(with_ids=True),
}


def _value_and_grads(loss_fn: LossFn, rows: slice) -> dict[str, Tensor]:
    model = _Towers()
    images, texts = _data()
    loss = loss_fn(model, images[rows], texts[rows], IDS[rows])
    loss.backward()
    result = {"loss": loss.detach()}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:  # the bias is SigLIP's only
            result[name] = parameter.grad.clone()
    return result


def _worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        results: dict[str, object] = {"rank_and_world": rank_and_world()}

        x = (torch.arange(BATCH * 3, dtype=torch.float).reshape(BATCH, 3) + 100 * rank).requires_grad_()
        weights = torch.linspace(-1, 1, WORLD * BATCH * 3).reshape(WORLD * BATCH, 3)
        gathered = gather_with_grad(x)
        (gathered * weights).sum().backward()
        results["gathered"] = gathered.detach()
        results["gather_grad"] = x.grad
        results["gathered_ids"] = gather_no_grad(IDS[rows])

        # This rank's rows sit in columns rank*B .. rank*B+B-1 of the gathered similarities.
        sim = torch.zeros(BATCH, WORLD * BATCH)
        generator = torch.Generator().manual_seed(rank)
        draws = torch.stack([sample_hard_negatives(sim, sim, generator=generator)[0] for _ in range(200)])
        results["negatives"] = draws

        # the text rule across ranks: keys gathered like the embeddings, similarities favouring false negatives
        keys = gather_no_grad(_caption_keys(CAPTIONS[rows]))
        ids = gather_no_grad(IDS[rows])
        same = torch.tensor([[canonicalize_text(a) == canonicalize_text(b) for b in CAPTIONS] for a in CAPTIONS[rows]])
        text_draws, image_draws = [], []
        for _ in range(200):
            noisy = same.float() * 20 + torch.randn(BATCH, WORLD * BATCH, generator=generator)
            draw = draw_negatives(noisy, noisy.clone(), image_ids=ids, text_keys=keys, generator=generator)
            text_draws.append(torch.where(draw.has_text, draw.text, -1))
            image_draws.append(torch.where(draw.has_image, draw.image, -1))
        results["text_rule"] = (torch.stack(text_draws), torch.stack(image_draws), keys)
        # the shared-text rule: a caption of several images (in any rank's rows) is never a negative text
        shared_draws = [draw_negatives(same.float() * 20 + torch.randn(BATCH, WORLD * BATCH, generator=generator),
                                       same.float() * 20, image_ids=ids, text_keys=keys, exclusion="shared_text",
                                       generator=generator) for _ in range(200)]
        results["shared_rule"] = (torch.stack([torch.where(d.has_text, d.text, -1) for d in shared_draws]),
                                  torch.stack([d.has_image for d in shared_draws]))

        for name, loss_fn in CASES.items():
            results[name] = _value_and_grads(loss_fn, rows)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir: Path = tmp_path_factory.mktemp("gather")
    mp.spawn(_worker, args=(str(out_dir),), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def test_gather_forward_and_backward(ranks: list[dict]) -> None:
    weights = torch.linspace(-1, 1, WORLD * BATCH * 3).reshape(WORLD * BATCH, 3)
    expected = torch.cat([torch.arange(BATCH * 3, dtype=torch.float).reshape(BATCH, 3) + 100 * r for r in range(WORLD)])
    for rank, result in enumerate(ranks):
        assert result["rank_and_world"] == (rank, WORLD)
        assert torch.equal(result["gathered"], expected)
        # Every rank differentiates the same sum, so a rank's rows collect W copies of their weights.
        assert torch.allclose(result["gather_grad"], WORLD * weights[rank * BATCH : (rank + 1) * BATCH])
        assert torch.equal(result["gathered_ids"], IDS)


def test_text_rule_across_ranks_never_draws_a_same_text_or_same_image_negative(ranks: list[dict]) -> None:
    canon = [canonicalize_text(c) for c in CAPTIONS]
    single = _caption_keys(CAPTIONS)
    for rank, result in enumerate(ranks):
        text_draws, image_draws, keys = result["text_rule"]
        assert torch.equal(keys, single)  # the same keys in every process
        for local in range(BATCH):
            row = rank * BATCH + local
            for drawn in (text_draws[:, local], image_draws[:, local]):
                picked = [int(c) for c in drawn if c >= 0]
                assert picked, (rank, local)
                assert all(canon[c] != canon[row] and IDS[c] != IDS[row] for c in picked)


def test_shared_text_rule_across_ranks(ranks: list[dict]) -> None:
    canon = [canonicalize_text(c) for c in CAPTIONS]
    images_of = {text: {int(IDS[i]) for i, c in enumerate(canon) if c == text} for text in canon}
    shared = [len(images_of[text]) > 1 for text in canon]
    assert any(shared) and not all(shared)
    for rank, result in enumerate(ranks):
        text_draws, has_image = result["shared_rule"]
        assert all(not shared[int(c)] for c in text_draws.flatten() if c >= 0)
        assert has_image.tolist() == [[not shared[rank * BATCH + r] for r in range(BATCH)]] * len(has_image)


def test_hard_negatives_offset_by_rank(ranks: list[dict]) -> None:
    for rank, result in enumerate(ranks):
        positive = torch.arange(BATCH) + rank * BATCH
        assert not (result["negatives"] == positive).any()
        assert result["negatives"].max() < WORLD * BATCH


def _check_against_single_process(ranks: list[dict], case: str, same_value_on_ranks: bool) -> None:
    reference = _value_and_grads(CASES[case], slice(None))
    values = torch.stack([result[case]["loss"] for result in ranks])
    if same_value_on_ranks:
        assert torch.allclose(values, reference["loss"].expand(WORLD), atol=1e-6), (values, reference["loss"])
    else:
        assert torch.allclose(values.mean(), reference["loss"], atol=1e-6), (values, reference["loss"])
    for name, grad in reference.items():
        if name == "loss":
            continue
        assert all(name in result[case] for result in ranks), (case, name)
        averaged = torch.stack([result[case][name] for result in ranks]).mean(dim=0)
        assert torch.allclose(averaged, grad, atol=1e-5), (case, name, averaged, grad)


@pytest.mark.parametrize("case", ["global", "global_ids"])
def test_global_contrastive_matches_single_process(ranks: list[dict], case: str) -> None:
    _check_against_single_process(ranks, case, same_value_on_ranks=True)


@pytest.mark.parametrize("case", ["local", "local_ids"])
def test_local_contrastive_matches_single_process(ranks: list[dict], case: str) -> None:
    # Each rank holds the loss of its own rows; they differ, their mean is the global loss.
    assert not torch.allclose(ranks[0][case]["loss"], ranks[1][case]["loss"])
    _check_against_single_process(ranks, case, same_value_on_ranks=False)


@pytest.mark.parametrize("case", ["siglip", "siglip_ids"])
def test_siglip_matches_single_process(ranks: list[dict], case: str) -> None:
    _check_against_single_process(ranks, case, same_value_on_ranks=False)
