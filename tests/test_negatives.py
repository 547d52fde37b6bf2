"""False-negative-aware ITM negative mining: text keys, exclusion rules, rows without a negative, ITC text
positives and the objective's ITM diagnostics."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from open_clip.tokenizer import canonicalize_text

from vlp.config.validate import NEGATIVE_EXCLUSIONS as CONFIG_EXCLUSIONS
from vlp.losses import (
    contrastive_loss,
    draw_negatives,
    itm_loss,
    itm_pair_weights,
    sample_hard_negatives,
    siglip_loss,
)
from vlp.losses.negatives import (
    NEGATIVE_EXCLUSIONS,
    caption_key,
    negative_masks,
    shared_texts,
    text_keys,
    token_key,
)

# Web-like captions: several repeat across images, some only up to case/punctuation/spacing.
CAPTIONS = ["a dog", "A dog.", "logo", "image", "a red car", "logo", "a  dog ", "image", "two cats", "a_red car"]
IMAGE_IDS = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])


def _keys(captions: list[str]) -> torch.Tensor:
    vocabulary: dict[str, int] = {}
    ids = torch.tensor([[1, vocabulary.setdefault(canonicalize_text(c), len(vocabulary) + 3), 2] for c in captions])
    return text_keys(ids, torch.ones_like(ids, dtype=torch.bool), captions)


def _same_text(captions: list[str]) -> torch.Tensor:
    canon = [canonicalize_text(c) for c in captions]
    return torch.tensor([[a == b for b in canon] for a in canon])


def test_config_lists_the_same_rules() -> None:
    assert CONFIG_EXCLUSIONS == NEGATIVE_EXCLUSIONS


def test_caption_keys_follow_open_clip_canonicalization() -> None:
    assert caption_key("A dog.") == caption_key("a dog") == caption_key("  a   DOG!! ") == caption_key("a_dog")
    assert caption_key("a dog") != caption_key("a cat")
    assert token_key([1, 5, 7]) == token_key([1, 5, 7]) != token_key([1, 5, 8])


def test_keys_are_the_same_in_every_process() -> None:
    # Python's hash() is salted per process; the keys must not be (ranks compare them after a gather).
    code = "from vlp.losses.negatives import caption_key, token_key; print(caption_key('A dog.'), token_key([3, 4]))"
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outputs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   check=True).stdout)
    assert outputs == {f"{caption_key('A dog.')} {token_key([3, 4])}\n"}


def test_token_key_covers_captions_that_differ_only_past_truncation() -> None:
    ids = torch.tensor([[1, 7, 8, 9, 2], [1, 7, 8, 9, 2], [1, 7, 8, 6, 2]])
    keys = text_keys(ids, torch.ones_like(ids, dtype=torch.bool), ["a b c long tail", "a b c other tail", "x"])
    assert keys[0, 0] != keys[1, 0] and keys[0, 1] == keys[1, 1] != keys[2, 1]
    masks = negative_masks(3, 0, torch.arange(3), keys, "text")
    assert not masks[0][0, 1] and not masks[1][1, 0] and masks[0][0, 2]


@pytest.mark.parametrize("hard", [True, False])
def test_text_rule_never_draws_a_same_text_or_same_image_negative(hard: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    keys, same = _keys(CAPTIONS), _same_text(CAPTIONS)
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 0, 7, 8, 9])  # rows 0 and 6: one image, two captions
    for _ in range(300):
        # similarities that favour exactly the false negatives, as a trained ITC does
        sim = same.float() * 20 + torch.randn(10, 10, generator=generator)
        draw = draw_negatives(sim, sim.T.clone(), image_ids=ids, text_keys=keys, generator=generator, hard=hard)
        rows = torch.arange(10)
        for negative, has in ((draw.text, draw.has_text), (draw.image, draw.has_image)):
            assert has.all()
            assert not same[rows, negative].any()
            assert not (ids[negative] == ids).any()


def test_an_image_is_no_negative_when_any_of_its_captions_is_the_text() -> None:
    # image 0 has captions "logo" (row 0) and "a dog" (row 1); for text "a dog" of image 1 (row 2) image 0 is
    # not a negative, although row 0's own caption differs.
    captions = ["logo", "a dog", "a dog", "two cats"]
    valid_text, valid_image = negative_masks(4, 0, torch.tensor([0, 0, 1, 2]), _keys(captions), "text")
    assert not valid_image[2, 0] and not valid_image[2, 1] and valid_image[2, 3]
    # and for image 1 (row 2, caption "a dog") both rows of image 0 hold a caption equal to one of its own?
    # only "a dog" is: text row 0 ("logo") stays a valid negative, text row 1 ("a dog") does not
    assert valid_text[2, 0] and not valid_text[2, 1] and valid_text[2, 3]


@pytest.mark.parametrize("hard", [True, False])
def test_shared_text_rule_never_draws_a_caption_of_several_images(hard: bool) -> None:
    # "a dog" (3 images), "logo", "image", "a red car" (2 each) name kinds of image; only "two cats" is one image's
    generator = torch.Generator().manual_seed(0)
    keys, same = _keys(CAPTIONS), _same_text(CAPTIONS)
    shared = same.sum(dim=1) > 1
    assert torch.equal(shared_texts(IMAGE_IDS, keys), shared)
    for _ in range(300):
        sim = same.float() * 20 + torch.randn(10, 10, generator=generator)  # favour the false negatives
        draw = draw_negatives(sim, sim.T.clone(), image_ids=IMAGE_IDS, text_keys=keys, exclusion="shared_text",
                              generator=generator, hard=hard)
        assert not shared[draw.text[draw.has_text]].any()  # a shared caption is never a negative text
        assert torch.equal(draw.has_image, ~shared)  # and its row draws no negative image: any image may fit it
        assert torch.equal(draw.has_text, ~same[8])  # "two cats" is every other image's negative text, and the only one
    text_rule = negative_masks(10, 0, IMAGE_IDS, keys, "text")
    shared_rule = negative_masks(10, 0, IMAGE_IDS, keys, "shared_text")
    assert all((strict <= loose).all() for strict, loose in zip(shared_rule, text_rule))


def test_one_image_captioned_twice_alike_is_not_a_shared_text() -> None:
    captions = ["logo", "logo", "a dog", "a cat"]
    assert shared_texts(torch.tensor([0, 0, 1, 2]), _keys(captions)).tolist() == [False] * 4
    assert shared_texts(torch.tensor([0, 3, 1, 2]), _keys(captions)).tolist() == [True, True, False, False]


def test_albef_rules_stay_one_key_away() -> None:
    keys, ids = _keys(CAPTIONS), torch.tensor([0, 1, 2, 3, 4, 5, 0, 7, 8, 9])
    pair_text, pair_image = negative_masks(10, 0, ids, keys, "pair")
    assert torch.equal(pair_text, ~torch.eye(10, dtype=torch.bool)) and torch.equal(pair_image, pair_text)
    id_text, _ = negative_masks(10, 0, ids, keys, "image_id")
    assert torch.equal(id_text, ids[:, None] != ids[None, :])
    text_rule, _ = negative_masks(10, 0, ids, keys, "text")
    assert (text_rule <= id_text).all() and (text_rule != id_text).any()
    with pytest.raises(ValueError, match="unknown negative exclusion"):
        negative_masks(10, 0, ids, keys, "captions")


def test_gathered_columns_offset_the_pair() -> None:
    keys = _keys(CAPTIONS)
    valid_text, _ = negative_masks(5, 5, IMAGE_IDS, keys, "text")  # the second rank's rows
    same = _same_text(CAPTIONS)[5:]
    assert torch.equal(valid_text, ~same)


def test_rows_without_negative_are_reported_not_raised() -> None:
    captions = ["logo", "logo", "logo", "a dog", "a cat"]
    keys = _keys(captions)
    sim = torch.zeros(5, 5)
    draw = draw_negatives(sim, sim, image_ids=torch.tensor([0, 1, 2, 3, 3]), text_keys=keys,
                          generator=torch.Generator().manual_seed(0))
    # rows 0-2 have the two other images' texts "a dog"/"a cat"; rows 3 and 4 (one image) have rows 0-2
    assert draw.has_text.all() and draw.has_image.all()
    ids = torch.tensor([0, 0, 0, 0, 0])
    draw = draw_negatives(sim, sim, image_ids=ids, text_keys=keys)
    assert not draw.has_text.any() and not draw.has_image.any() and draw.rows_without_negative == 10
    assert draw.excluded_fraction == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no valid ITM negative"):  # the old entry point keeps its error
        sample_hard_negatives(sim, sim, image_ids=ids)


def test_dropped_pairs_leave_the_itm_mean() -> None:
    logits = torch.randn(9, 2, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
    has_image, has_text = torch.tensor([True, False, True]), torch.tensor([True, True, False])
    weights = itm_pair_weights(has_image, has_text)
    kept = weights.bool()
    expected = F.cross_entropy(logits[kept], labels[kept])
    assert torch.allclose(itm_loss(logits, labels, weights), expected)
    # a chunk divides by the whole batch's count: two halves add up to the mean
    halves = itm_loss(logits[:4], labels[:4], weights[:4], float(weights.sum())) + \
        itm_loss(logits[4:], labels[4:], weights[4:], float(weights.sum()))
    assert torch.allclose(halves, expected)


def test_margin_skips_candidates_far_above_the_positive() -> None:
    sim = torch.zeros(3, 3)
    sim[0, 1] = 5.0  # far above row 0's positive
    draw = draw_negatives(sim, sim.clone(), exclusion="pair", margin=1.0, generator=torch.Generator().manual_seed(0))
    draws = torch.stack([draw_negatives(sim, sim.clone(), exclusion="pair", margin=1.0,
                                        generator=torch.Generator().manual_seed(s)).text for s in range(50)])
    assert draw.has_text.all() and not (draws[:, 0] == 1).any()
    unbounded = torch.stack([draw_negatives(sim, sim.clone(), exclusion="pair",
                                            generator=torch.Generator().manual_seed(s)).text for s in range(50)])
    assert (unbounded[:, 0] == 1).float().mean() > 0.9  # hard mining would pick it almost always


def test_itc_text_positives() -> None:
    generator = torch.Generator().manual_seed(0)
    image, text = torch.randn(10, 8, generator=generator), torch.randn(10, 8, generator=generator)
    keys = _keys(CAPTIONS)
    positives = (_same_text(CAPTIONS) | torch.eye(10, dtype=torch.bool)).float()
    targets = positives / positives.sum(1, keepdim=True)
    logits = 10 * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    expected = (-(targets * logits.log_softmax(1)).sum(1).mean() - (targets * logits.T.log_softmax(1)).sum(1).mean()) / 2
    assert torch.allclose(contrastive_loss(image, text, 10.0, text_keys=keys), expected, atol=1e-6)
    assert not torch.allclose(contrastive_loss(image, text, 10.0), expected, atol=1e-3)
    labels = positives * 2 - 1
    sig = -F.logsigmoid(labels * (logits - 3.0)).sum() / 10
    assert torch.allclose(siglip_loss(image, text, 10.0, -3.0, text_keys=keys), sig, atol=1e-5)


def _tiny_model() -> Any:
    from vlp.models import VLPModel

    torch.manual_seed(0)
    return VLPModel.from_config("configs/models/albef_base_tiny.yaml")


def _captured_draws(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    import vlp.objectives.pretrain as pretrain

    draws: list[Any] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        draws.append(draw_negatives(*args, **kwargs))
        return draws[-1]

    monkeypatch.setattr(pretrain, "draw_negatives", recording)
    return draws


def _check_batch_draws(batch: dict[str, Any], draws: list[Any]) -> None:
    canon = [canonicalize_text(c) for c in batch["captions"]]
    ids = batch["image_ids"]
    assert draws
    for draw in draws:
        for row, (text, image) in enumerate(zip(draw.text.tolist(), draw.image.tolist())):
            if draw.has_text[row]:
                assert canon[text] != canon[row] and ids[text] != ids[row]
            if draw.has_image[row]:
                assert canon[image] != canon[row] and ids[image] != ids[row]


def test_objective_never_mines_a_same_text_negative(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlp.config.schema import ObjectiveConfig
    from vlp.objectives.pretrain import PretrainObjective

    model = _tiny_model()
    draws = _captured_draws(monkeypatch)
    captions = ["logo", "Logo.", "a dog", "image", "image", "a cat", "LOGO", "a_dog"]
    tokens = model.tokenizer(captions, max_length=16)
    batch = {"images": torch.randn(8, 3, 32, 32), "input_ids": tokens["input_ids"],
             "attention_mask": tokens["attention_mask"], "image_ids": torch.arange(8), "captions": captions}
    size = model.image_encoder.image_size
    batch["images"] = torch.randn(8, 3, size, size)
    objective = PretrainObjective(model, ObjectiveConfig(), generator=torch.Generator().manual_seed(0))
    for _ in range(20):
        out = objective(batch)
    _check_batch_draws(batch, draws)
    assert out.terms["itm_excluded_fraction"] > 0.1
    assert {"itm_acc_pos", "itm_acc_neg", "itm_rows_without_negative"} <= set(out.terms)
    # the label prior's loss: 1:2 less the dropped negative pairs
    kept = 3 * 8 - float(out.terms["itm_rows_without_negative"])
    q = 8 / kept
    assert float(out.terms["itm_label_prior"]) == pytest.approx(-(q * math.log(q) + (1 - q) * math.log(1 - q)))
    # ALBEF's pretraining rule is one key away, and it does draw the repeated texts
    draws.clear()
    albef = PretrainObjective(model, ObjectiveConfig(negative_exclusion="pair"), generator=torch.Generator().manual_seed(0))
    for _ in range(20):
        albef(batch)
    canon = [canonicalize_text(c) for c in captions]
    assert any(canon[t] == canon[r] for d in draws for r, t in enumerate(d.text.tolist()))


def test_a_batch_of_one_caption_drops_its_negatives_without_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlp.config.schema import ObjectiveConfig
    from vlp.objectives.pretrain import PretrainObjective

    model = _tiny_model()
    captions = ["image"] * 4
    tokens = model.tokenizer(captions, max_length=16)
    size = model.image_encoder.image_size
    batch = {"images": torch.randn(4, 3, size, size), "input_ids": tokens["input_ids"],
             "attention_mask": tokens["attention_mask"], "image_ids": torch.arange(4), "captions": captions}
    out = PretrainObjective(model, ObjectiveConfig())(batch)
    assert out.terms["itm_rows_without_negative"] == 8 and torch.isfinite(out.total)
    assert float(out.terms["itm_label_prior"]) == 0.0  # only positives are left: nothing to predict


def test_streaming_batches_carry_what_the_rule_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import tarfile

    from PIL import Image

    from vlp.config.io import load_config
    from vlp.train.distributed import DistInfo
    from vlp.train.loop import build_loader

    captions = ["logo", "a red car", "Logo!", "image", "two cats", "image", "a dog", "logo"] * 2
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for index, caption in enumerate(captions):
            buffer = io.BytesIO()
            Image.new("RGB", (16, 16), (index * 15, 0, 0)).save(buffer, format="PNG")
            for ext, payload in (("png", buffer.getvalue()), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"s{index:05d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    config = load_config("configs/pretrain/demo_tiny.yaml", [
        "data.source=webdataset", f"data.train={tmp_path}/shard-000.tar", "data.batch_size=8", "data.num_workers=0",
        "model.text.tokenizer=synthetic"])
    model = _tiny_model()
    loader, _, _ = build_loader(config, model, DistInfo(0, 0, 1, torch.device("cpu")))
    batch = next(iter(loader))
    assert len(batch["captions"]) == 8 and len(set(batch["image_ids"].tolist())) == 8
    # the collator hashed the texts in the loader: the same keys the objective would compute
    assert torch.equal(batch["text_keys"], text_keys(batch["input_ids"], batch["attention_mask"], batch["captions"]))
    from vlp.objectives.pretrain import PretrainObjective

    draws = _captured_draws(monkeypatch)
    PretrainObjective(model, config.objective, generator=torch.Generator().manual_seed(0))(batch)
    _check_batch_draws(batch, draws)
