"""The ITM negative pool (objective.itm_negative_pool): what it keeps, that its rows obey the negative rules
in one process and across 2 gloo ranks, that drawn pool rows are the current towers' outputs without
gradient, the start step, the chunked step, exact resume and the config checks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from open_clip.tokenizer import canonicalize_text

from vlp.config.schema import ObjectiveConfig
from vlp.losses import draw_negatives
from vlp.objectives.negative_pool import NegativePool

# captions that repeat (up to case and punctuation) within and across batches, as a second epoch repeats them
CAPTIONS = ["logo", "a dog", "Image.", "two cats", "a red car", "LOGO", "image", "a dog!", "three birds",
            "a blue cup", "Logo", "a green box"]
STEPS, BATCH = 8, 6


def _tiny_model() -> Any:
    from vlp.models import VLPModel

    torch.manual_seed(0)
    return VLPModel.from_config("configs/models/albef_base_tiny.yaml")


def _batch(model: Any, step: int, rank: int = 0) -> dict[str, Any]:
    """Batch ``step``: 6 of 12 (image id, caption) pairs, chosen so that pairs come back in later steps."""
    rows = [(step * 5 + 7 * rank + i * 7) % len(CAPTIONS) for i in range(BATCH)]
    captions = [CAPTIONS[r] for r in rows]
    tokens = model.tokenizer(captions, max_length=8 + step % 3)  # the token length varies between steps
    size = model.image_encoder.image_size
    generator = torch.Generator().manual_seed(100 * rank + step)
    return {"images": torch.randn(BATCH, 3, size, size, generator=generator), "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"], "image_ids": torch.tensor(rows), "captions": captions}


def _recorded_draws(module: Any) -> list[Any]:
    draws: list[Any] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        draws.append((draw_negatives(*args, **kwargs), kwargs["image_ids"].clone()))
        return draws[-1][0]

    module.draw_negatives = recording
    return draws


def _run(objective: Any, model: Any, steps: int, rank: int = 0) -> list[dict[str, Any]]:
    batches = []
    for step in range(steps):
        batch = _batch(model, step, rank)
        objective(batch)
        objective.after_optimizer_step()
        batches.append(batch)
    return batches


def _violations(draws: list[Any], columns_of: Any) -> tuple[int, int]:
    """(drawn negatives that share the row's canonical text or image id, negatives drawn from the pool)."""
    bad = from_pool = 0
    for step, (draw, ids) in enumerate(draws):
        columns, rows, batch_columns = columns_of(step)
        for row in range(len(draw.text)):
            own_text, own_id = rows[row]
            for index, valid in ((int(draw.text[row]), draw.has_text[row]), (int(draw.image[row]), draw.has_image[row])):
                if not valid:
                    continue
                text, image_id = columns[index]
                assert int(ids[index]) == image_id
                bad += canonicalize_text(text) == canonicalize_text(own_text) or image_id == own_id
                from_pool += index >= batch_columns
    return bad, from_pool


def test_pool_keeps_the_newest_pairs_first_up_to_its_size_and_pads_token_ids() -> None:
    pool = NegativePool(5)
    for step, length in enumerate((4, 6, 3)):
        ids = torch.full((2, length), step + 1)
        pool.add(torch.full((2, 3, 2, 2), float(step)), ids, torch.ones(2, length), None, None,
                 torch.randn(2, 4), torch.randn(2, 4))
    t = pool.tensors
    assert len(pool) == 5
    assert t["images"][:, 0, 0, 0].tolist() == [2, 2, 1, 1, 0]  # newest first, the oldest pair gone
    assert t["input_ids"].shape[1] == 6
    assert t["input_ids"][0].tolist() == [3, 3, 3, 0, 0, 0] and t["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    ids = t["image_ids"].tolist()  # pairs without image ids get ids of their own, below any real id
    assert len(set(ids)) == 5 and max(ids) < 0
    restored = NegativePool(5)
    restored.load_state_dict(pool.state_dict())
    assert all(torch.equal(restored.tensors[k], v) for k, v in t.items())


def test_pool_rows_obey_the_negative_rules_and_are_drawn() -> None:
    import vlp.objectives.pretrain as pretrain
    from vlp.objectives.pretrain import PretrainObjective

    model = _tiny_model()
    draws = _recorded_draws(pretrain)
    try:
        objective = PretrainObjective(model, ObjectiveConfig(itm_negative_pool=10),
                                      generator=torch.Generator().manual_seed(0)).train()
        batches = _run(objective, model, STEPS)
    finally:
        pretrain.draw_negatives = draw_negatives

    def columns_of(step: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]], int]:
        def pairs(batch: dict[str, Any]) -> list[tuple[str, int]]:
            return list(zip(batch["captions"], batch["image_ids"].tolist()))

        pool = [pair for earlier in reversed(batches[:step]) for pair in pairs(earlier)][:10]
        return pairs(batches[step]) + pool, pairs(batches[step]), BATCH

    bad, from_pool = _violations(draws, columns_of)
    assert bad == 0
    assert from_pool > STEPS  # the pool is used, not only filled


def test_drawn_pool_rows_are_the_current_towers_outputs_without_gradient() -> None:
    from vlp.losses import NegativeDraw

    model = _tiny_model().train()
    pool = NegativePool(8)
    batch = _batch(model, 0)
    pool.add(batch["images"], batch["input_ids"], batch["attention_mask"], batch["image_ids"], None,
             torch.randn(BATCH, 8), torch.randn(BATCH, 8))
    text_out, _ = model.text_features(batch["input_ids"][:2], batch["attention_mask"][:2].bool())
    image_out, _ = model.image_features(batch["images"][:2])
    draw = NegativeDraw(torch.tensor([1, 2 + 3]), torch.tensor([2 + 4, 0]), torch.ones(2, dtype=torch.bool),
                        torch.ones(2, dtype=torch.bool), 0.0)
    moved, texts, images = pool.extend(model, draw, 2, text_out, image_out)
    assert moved.text.tolist() == [1, 2] and moved.image.tolist() == [2, 0]
    expected_text, _ = model.text_features(batch["input_ids"][3:4], batch["attention_mask"][3:4].bool())
    expected_image, _ = model.image_features(batch["images"][4:5])
    assert torch.allclose(texts.select(moved.text[1:]).pooled, expected_text.pooled, atol=1e-5)
    assert torch.allclose(images.select(moved.image[:1]).tokens, expected_image.tokens, atol=1e-5)
    weights = [p for p in model.parameters() if p.requires_grad]
    appended = torch.autograd.grad(texts.tokens[2:].sum() + images.tokens[2:].sum(), weights, allow_unused=True,
                                   retain_graph=True)
    assert all(g is None or not g.any() for g in appended)  # the pool rows reach no weight
    gathered = torch.autograd.grad(texts.tokens[:2].sum() + images.tokens[:2].sum(), weights, allow_unused=True)
    assert any(g is not None and g.any() for g in gathered)  # the batch's own rows keep their gradient


def test_pool_waits_for_its_start_step() -> None:
    import vlp.objectives.pretrain as pretrain
    from vlp.objectives.pretrain import PretrainObjective

    model = _tiny_model()
    draws = _recorded_draws(pretrain)
    try:
        objective = PretrainObjective(model, ObjectiveConfig(itm_negative_pool=10, itm_pool_start=4),
                                      generator=torch.Generator().manual_seed(0)).train()
        _run(objective, model, 6)
    finally:
        pretrain.draw_negatives = draw_negatives
    columns = [len(ids) for _, ids in draws]
    assert columns[:4] == [BATCH] * 4 and all(c > BATCH for c in columns[4:])


def test_resumed_objective_draws_what_an_uninterrupted_one_draws() -> None:
    from vlp.objectives.pretrain import PretrainObjective

    model = _tiny_model()
    config = ObjectiveConfig(itm_negative_pool=10, itm_pool_start=1)
    first = PretrainObjective(model, config, generator=torch.Generator().manual_seed(0)).train()
    _run(first, model, 3)
    state = first.extra_state_dict()
    assert state["itm_pool.optimizer_steps"] == 3 and state["itm_pool.images"].shape[0] == 10
    generator_state = first.generator.get_state()
    resumed = PretrainObjective(model, config, generator=torch.Generator()).train()
    resumed.load_extra_state_dict(state)
    resumed.generator.set_state(generator_state)
    batch = _batch(model, 3)
    torch.manual_seed(5)
    expected = first(batch)
    torch.manual_seed(5)
    got = resumed(batch)
    assert torch.equal(got.total, expected.total)


def test_chunked_step_with_the_pool_equals_the_whole_batch_step() -> None:
    from vlp.objectives.pretrain import PretrainObjective

    config = ObjectiveConfig(itm_negative_pool=10)
    totals = []
    for chunk in (0, 3):
        model = _tiny_model()
        objective = PretrainObjective(model, config, generator=torch.Generator().manual_seed(0),
                                      chunk_size=chunk).train()
        for step in range(3):
            model.zero_grad()
            out = objective.training_step(_batch(model, step))
            objective.after_optimizer_step()
        totals.append(out.terms["itm"])
    assert torch.allclose(totals[0], totals[1], atol=1e-5)


def _rank_worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2)
    try:
        import vlp.objectives.pretrain as pretrain
        from vlp.objectives.pretrain import PretrainObjective

        model = _tiny_model()
        draws = _recorded_draws(pretrain)
        objective = PretrainObjective(model, ObjectiveConfig(itm_negative_pool=8),
                                      generator=torch.Generator().manual_seed(rank)).train()
        _run(objective, model, 5, rank)
        torch.save([(d.text, d.image, d.has_text, d.has_image, ids) for d, ids in draws],
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_pool_rows_obey_the_negative_rules_across_two_ranks(tmp_path: Path) -> None:
    from vlp.losses import NegativeDraw

    mp.spawn(_rank_worker, args=(str(tmp_path),), nprocs=2, join=True)
    model = _tiny_model()

    def pairs(step: int, rank: int) -> list[tuple[str, int]]:
        batch = _batch(model, step, rank)
        return list(zip(batch["captions"], batch["image_ids"].tolist()))

    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        draws = [(NegativeDraw(t, i, ht, hi, 0.0), ids) for t, i, ht, hi, ids in saved]

        def columns_of(step: int, rank: int = rank) -> tuple[list[tuple[str, int]], list[tuple[str, int]], int]:
            gathered = pairs(step, 0) + pairs(step, 1)  # the batch columns in rank order, then this rank's pool
            pool = [pair for earlier in reversed(range(step)) for pair in pairs(earlier, rank)][:8]
            return gathered + pool, pairs(step, rank), 2 * BATCH

        bad, from_pool = _violations(draws, columns_of)
        assert bad == 0 and from_pool > 0


@pytest.mark.parametrize("override, message", [
    ("objective.itm_negative_pool=-1", "objective.itm_negative_pool"),
    ("objective.itm_pool_start=-2", "objective.itm_pool_start"),
])
def test_bad_pool_settings_name_their_key(override: str, message: str) -> None:
    from vlp.config.io import load_config
    from vlp.errors import UserError

    with pytest.raises(UserError, match=message):
        load_config("configs/pretrain/demo_tiny.yaml", [override])


def test_a_pool_without_itm_is_refused() -> None:
    from vlp.config.io import load_config
    from vlp.errors import UserError

    with pytest.raises(UserError, match="itm_negative_pool"):
        load_config("configs/pretrain/clip_cc3m_tiny.yaml", ["objective.itm_negative_pool=64"])


def test_the_pool_says_once_what_it_keeps_in_memory_and_checkpoints(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import re

    model = _tiny_model()
    pool = NegativePool(10)
    with caplog.at_level(logging.INFO, logger="vlp"):
        for step in range(3):
            batch = _batch(model, step)
            pool.add(batch["images"], batch["input_ids"], batch["attention_mask"], batch["image_ids"], None,
                     torch.randn(BATCH, 8), torch.randn(BATCH, 8))
    lines = [r.getMessage() for r in caplog.records if "itm_negative_pool" in r.getMessage()]
    assert len(lines) == 1
    size = model.image_encoder.image_size
    assert f"last 10 training pairs (images 3x{size}x{size})" in lines[0]
    megabytes = float(re.search(r"about ([\d.]+) MB", lines[0]).group(1))  # type: ignore[union-attr]
    images_only = 10 * 3 * size * size * 4 / 1e6  # float32 images; ids, masks and embeddings add a little
    assert images_only - 0.05 <= megabytes <= images_only * 1.1 + 0.05
