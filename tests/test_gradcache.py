"""Gradient cache (``train.contrastive_chunk_size``): a batch of 64 in chunks of 8 gives the parameter
gradients of the unchunked batch (1e-5, fp32) for ITC, SigLIP and momentum-distilled ITC; with ITM the
contrastive part and the loss values still match; RNG replay, accumulation scale, bf16, and two gloo
processes under DistributedDataParallel against one process on the global batch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from vlp.config import ObjectiveConfig
from vlp.models import VLPModel
from vlp.objectives import PretrainObjective
from vlp.objectives.gradcache import chunk_slices, take_rows
from vlp.types import EncoderOutput, LossOutput

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["red", "blue", "green", "circle", "square", "triangle", "left", "right", "top", "bottom", "a", "the"]
CONTRASTIVE_PARAMS = ("image_proj.", "text_proj.", "temperature.")  # reached by the contrastive loss only
Grads = dict[str, torch.Tensor]


def _model(preset: str, **overrides: Any) -> VLPModel:
    torch.manual_seed(0)
    source: Any = ROOT / "configs" / "models" / f"{preset}.yaml"
    if overrides:
        import yaml

        data = yaml.safe_load(source.read_text())["model"]
        for section, values in overrides.items():
            data[section] = {**data[section], **values}
        source = data
    return VLPModel.from_config(source)


def _batch(model: VLPModel, n: int) -> dict[str, torch.Tensor]:
    size = model.image_encoder.image_size
    captions = [" ".join(WORDS[(7 * i + 5 * j) % len(WORDS)] for j in range(2 + i % 6)) for i in range(n)]
    tokens = model.tokenizer(captions, max_length=model.config.text.max_length)
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    return {"images": images, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
            "image_ids": torch.arange(n)}


def _step(model: VLPModel, config: ObjectiveConfig, batch: dict[str, torch.Tensor], chunk: int,
          scale: float = 1.0, precision: str = "fp32", force: bool = False, seed: int = 7) -> tuple[LossOutput, Grads]:
    """One step on a fresh copy of the model's gradients; ``force`` takes the chunked path even for one chunk."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the feature queue's random start
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else None
    objective = PretrainObjective(model, config, autocast=autocast, generator=torch.Generator().manual_seed(3),
                                  chunk_size=chunk)
    torch.manual_seed(seed)  # dropout masks
    out = objective.training_step_chunked(batch, scale) if force else objective.training_step(batch, scale)
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_equal(actual: Grads, expected: Grads, only: tuple[str, ...] = (), tol: float = 1e-5) -> None:
    names = [n for n in expected if not only or n.startswith(only)]
    assert names and set(names) <= set(actual)
    for name in names:
        torch.testing.assert_close(actual[name], expected[name], atol=tol, rtol=tol, msg=name)


def _assert_terms_equal(actual: LossOutput, expected: LossOutput, tol: float = 1e-5) -> None:
    assert actual.terms.keys() == expected.terms.keys()
    for key, value in expected.terms.items():
        torch.testing.assert_close(actual.terms[key], value, atol=tol, rtol=tol, msg=key)
    torch.testing.assert_close(actual.total, expected.total, atol=tol, rtol=tol)


@pytest.mark.parametrize("preset", ["albef_base_tiny", "siglip_base_tiny"])
def test_chunks_of_8_give_the_full_batch_gradient(preset: str) -> None:
    model = _model(preset)
    config = ObjectiveConfig(itm_weight=0.0)
    batch = _batch(model, 64)
    full_out, full = _step(model, config, batch, chunk=0)
    chunk_out, chunked = _step(model, config, batch, chunk=8)
    _assert_terms_equal(chunk_out, full_out)
    _assert_grads_equal(chunked, full)
    assert full.keys() == chunked.keys()
    # accumulation: scale multiplies every gradient, the reported loss stays unscaled
    half_out, half = _step(model, config, batch, chunk=8, scale=0.5)
    _assert_terms_equal(half_out, full_out)
    _assert_grads_equal(half, {n: g / 2 for n, g in full.items()})


def test_itm_enabled_contrastive_part_and_loss_values_still_match() -> None:
    model = _model("albef_base_tiny")
    config = ObjectiveConfig(itm_weight=1.0, mlm_weight=1.0)
    batch = _batch(model, 64)
    full_out, full = _step(model, config, batch, chunk=0)
    chunk_out, chunked = _step(model, config, batch, chunk=8)
    # same negatives and masks: every loss term is the full-batch value
    _assert_terms_equal(chunk_out, full_out)
    # the projections and temperature get gradient from the contrastive term only: exact
    _assert_grads_equal(chunked, full, only=CONTRASTIVE_PARAMS)
    assert all(torch.isfinite(g).all() for g in chunked.values()) and chunked.keys() == full.keys()
    # encoder gradients differ by the ITM negatives drawn from other chunks (they carry no gradient)
    assert not torch.allclose(chunked["text_encoder.embeddings.weight"], full["text_encoder.embeddings.weight"])


def test_mlm_is_exact_per_chunk_and_one_chunk_equals_unchunked_with_itm() -> None:
    model = _model("albef_base_tiny")
    batch = _batch(model, 32)
    # ITC + MLM: no cross-chunk coupling besides the contrastive loss, so the whole gradient matches
    config = ObjectiveConfig(itm_weight=0.0, mlm_weight=1.0)
    _assert_grads_equal(_step(model, config, batch, chunk=8)[1], _step(model, config, batch, chunk=0)[1])
    # one chunk through the gradient-cache path: every negative is in the chunk, all terms exact
    config = ObjectiveConfig(itm_weight=1.0, mlm_weight=1.0)
    full_out, full = _step(model, config, batch, chunk=0)
    one_out, one = _step(model, config, batch, chunk=32, force=True)
    _assert_terms_equal(one_out, full_out)
    _assert_grads_equal(one, full)


@pytest.mark.parametrize("preset", ["albef_base_tiny", "meter_base_tiny", "vilt_base_tiny"])
def test_shared_image_fusion_equals_per_pair_images(preset: str) -> None:
    """The unchunked step fuses the ITM pairs reading each batch image by index (one-way fusion: keys/values
    projected once per image) and, without MLM, only the last layer's [CLS] rows; the gradient-cache path
    (one chunk) copies every pair's image rows and runs full layers. Same loss and gradients."""
    model = _model(preset)
    batch = _batch(model, 16)
    config = ObjectiveConfig(itm_weight=1.0, mlm_weight=0.0)
    full_out, full = _step(model, config, batch, chunk=0)
    one_out, one = _step(model, config, batch, chunk=16, force=True)
    _assert_terms_equal(one_out, full_out)
    _assert_grads_equal(one, full)
    assert any(n.startswith("fusion.") and g.abs().max() > 0 for n, g in full.items())


def test_momentum_distillation_and_queue() -> None:
    model = _model("albef_base_tiny")
    config = ObjectiveConfig(itm_weight=0.0, momentum=0.9, queue_size=48)
    batch = _batch(model, 32)
    results = []
    for chunk in (0, 8):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        objective = PretrainObjective(model, config, chunk_size=chunk)
        out = objective.training_step(batch)
        assert objective.queue is not None
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        objective.queue.state_dict()))
    (full_out, full, full_queue), (chunk_out, chunked, chunk_queue) = results
    _assert_terms_equal(chunk_out, full_out)
    _assert_grads_equal(chunked, full)
    for key, value in full_queue.items():  # the momentum features were enqueued once, in order
        torch.testing.assert_close(chunk_queue[key], value, atol=1e-6, rtol=0)
    assert int(full_queue["ptr"]) == 32


def test_dropout_masks_are_replayed_in_the_second_pass() -> None:
    # one forced chunk draws the same dropout masks as the unchunked step only if pass 2 replays pass 1's RNG
    model = _model("albef_base_tiny", image={"dropout": 0.3}, text={"dropout": 0.3}).train()
    config = ObjectiveConfig(itm_weight=0.0)
    batch = _batch(model, 16)
    full_out, full = _step(model, config, batch, chunk=0)
    one_out, one = _step(model, config, batch, chunk=16, force=True)
    _assert_terms_equal(one_out, full_out)
    _assert_grads_equal(one, full)
    _, other_masks = _step(model, config, batch, chunk=0, seed=8)
    assert not torch.allclose(other_masks["image_proj.weight"], full["image_proj.weight"])  # dropout is active
    _, chunked = _step(model, config, batch, chunk=4)
    assert all(torch.isfinite(g).all() for g in chunked.values())


def test_bf16_autocast_is_close_to_unchunked() -> None:
    model = _model("albef_base_tiny")
    config = ObjectiveConfig(itm_weight=1.0)
    batch = _batch(model, 16)
    full_out, full = _step(model, config, batch, chunk=0, precision="bf16")
    chunk_out, chunked = _step(model, config, batch, chunk=4, precision="bf16")
    assert chunk_out.terms["itc"].dtype == torch.float32
    _assert_terms_equal(chunk_out, full_out, tol=2e-2)
    _assert_grads_equal(chunked, full, only=CONTRASTIVE_PARAMS, tol=5e-2)


def test_take_rows_mixes_live_and_cached_rows() -> None:
    live = EncoderOutput(torch.ones(2, 3, 4, requires_grad=True), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 4))
    cached = EncoderOutput(torch.zeros(6, 5, 4), torch.zeros(6, 5, dtype=torch.bool), torch.zeros(6, 4))
    out = take_rows(live, cached, torch.tensor([2, 0, 3, 5]), start=2)
    assert out.tokens.shape == (4, 5, 4)
    assert out.tokens[:, 0, 0].tolist() == [1.0, 0.0, 1.0, 0.0] and out.mask[:, :3].all(1).tolist() == [True, False, True, False]
    assert not out.mask[:, 3:].any()  # the live rows are padded to the cached length
    out.tokens.sum().backward()
    assert live.tokens.grad is not None and live.tokens.grad.sum() == 2 * 3 * 4  # one pick per live row
    assert chunk_slices(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]


# --------------------------------------------------------------------------- two processes (gloo, DDP)
WORLD, LOCAL = 2, 8


def _worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        results: dict[str, Any] = {}
        for preset, itm in (("albef_base_tiny", 0.0), ("siglip_base_tiny", 0.0), ("albef_base_tiny", 1.0)):
            model = _model(preset)
            batch = {k: v[rank * LOCAL:(rank + 1) * LOCAL] for k, v in _batch(model, WORLD * LOCAL).items()}
            objective = PretrainObjective(model, ObjectiveConfig(itm_weight=itm), chunk_size=4)
            objective.set_engine(DistributedDataParallel(objective))
            out = objective.training_step(batch)
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[f"{preset}/{itm}"] = (out.terms, grads)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process_on_the_global_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for key in ranks[0]:
        preset, itm = key.split("/")
        model = _model(preset)
        full_out, full = _step(model, ObjectiveConfig(itm_weight=float(itm)), _batch(model, WORLD * LOCAL), chunk=0)
        (terms0, grads0), (terms1, grads1) = ranks[0][key], ranks[1][key]
        for name in grads0:  # the averaged gradient is the same on every rank
            torch.testing.assert_close(grads0[name], grads1[name], atol=1e-6, rtol=1e-6)
        if float(itm) == 0:
            _assert_grads_equal(grads0, full)
        else:
            # ranks draw their own ITM negatives, so only the contrastive part is comparable
            _assert_grads_equal(grads0, full, only=CONTRASTIVE_PARAMS)
            assert all(torch.isfinite(g).all() for g in grads0.values()) and grads0.keys() == full.keys()
        if preset == "albef_base_tiny":  # the global softmax loss is the same on every rank
            torch.testing.assert_close(terms0["itc"], full_out.terms["itc"], atol=1e-5, rtol=1e-5)
        else:  # SigLIP: each rank holds its share, the mean is the global loss
            torch.testing.assert_close((terms0["itc"] + terms1["itc"]) / 2, full_out.terms["itc"], atol=1e-5, rtol=1e-5)


def test_itc_only_step_reads_pooled_rows_only_and_matches_full_encoders() -> None:
    """With ITC alone the objective asks the encoders for their pooled rows only; loss and every gradient
    equal open_clip-style full encoder passes followed by the same contrastive loss."""
    from vlp.losses import contrastive_loss

    torch.manual_seed(0)
    model = VLPModel.from_config({
        "name": "clip_native_tiny", "fusion": {"type": "none"}, "embed_dim": 16, "itm_head": False,
        "image": {"type": "vit", "image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "num_heads": 2},
        "text": {"type": "transformer", "tokenizer": "clip", "max_length": 32, "width": 32, "depth": 2,
                 "num_heads": 2, "causal": True, "pooling": "eos"},
    })
    batch = _batch(model, 8)
    config = ObjectiveConfig(itm_weight=0.0)
    out, grads = _step(model, config, batch, chunk=0)
    assert PretrainObjective(model, config).embeddings_only
    model.zero_grad(set_to_none=True)
    image_emb = model.encode_image(batch["images"])
    text_emb = model.encode_text(batch["input_ids"], batch["attention_mask"])
    reference = contrastive_loss(image_emb, text_emb, model.logit_scale(), image_ids=batch["image_ids"])
    reference.backward()
    torch.testing.assert_close(out.terms["itc"], reference.detach(), atol=1e-5, rtol=1e-5)
    _assert_grads_equal(grads, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
