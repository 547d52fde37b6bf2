"""Zero-shot classification: prompt ensembles against open_clip, known embeddings, ITM re-ranking."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.errors import UserError
from vlp.eval.zeroshot import evaluate_zeroshot, zeroshot_classifier
from vlp.types import EncoderOutput

CONTEXT = 16


@dataclass
class LabelledImages:
    images: list[Tensor]
    labels: list[int | str]

    def image_dataset(self, transform: Any) -> list[Tensor]:
        return self.images


class TinyOpenClip(nn.Module):
    """A random tiny open_clip CLIP behind the evaluation interface (a dual encoder)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.clip = open_clip.CLIP(
            embed_dim=16,
            vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8,
                                               image_size=16),
            text_cfg=open_clip.CLIPTextCfg(context_length=CONTEXT, vocab_size=49408, width=32, heads=2,
                                           layers=1),
        ).eval()
        self.has_fusion = False
        self.config = SimpleNamespace(text=SimpleNamespace(max_length=CONTEXT))

    def tokenizer(self, texts: list[str], max_length: int) -> dict[str, Tensor]:
        ids = open_clip.tokenize(texts, context_length=max_length)
        return {"input_ids": ids, "attention_mask": ids != 0}

    def image_features(self, images: Tensor) -> tuple[EncoderOutput, Tensor]:
        emb = self.clip.encode_image(images, normalize=True)
        return EncoderOutput(emb[:, None], torch.ones(len(emb), 1, dtype=torch.bool), emb), emb

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[EncoderOutput, Tensor]:
        emb = self.clip.encode_text(input_ids, normalize=True)
        return EncoderOutput(emb[:, None], attention_mask[:, :1], emb), emb


CLASSES = ["cat", "dog", "bird", "car", "tree", "boat", "house"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "art of a {}"]


def test_classifier_equals_open_clip_zero_shot_weights() -> None:
    model = TinyOpenClip()
    ours = zeroshot_classifier(model, CLASSES, TEMPLATES, batch_size=5, precision="fp32")
    reference = open_clip.build_zero_shot_classifier(
        model.clip, lambda texts: open_clip.tokenize(texts, context_length=CONTEXT), CLASSES, TEMPLATES,
        num_classes_per_batch=3)
    torch.testing.assert_close(ours, reference.T, atol=1e-5, rtol=1e-5)


def test_accuracy_equals_clip_topk_reference() -> None:
    model = TinyOpenClip()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(40, 3, 16, 16, generator=generator)
    labels = torch.randint(0, len(CLASSES), (40,), generator=generator)
    result = evaluate_zeroshot(model, LabelledImages(list(images), labels.tolist()), None, CLASSES, TEMPLATES,
                               batch_size=16, precision="fp32", progress=False)
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(
            model.clip, lambda texts: open_clip.tokenize(texts, context_length=CONTEXT), CLASSES, TEMPLATES)
        logits = 100.0 * model.clip.encode_image(images, normalize=True) @ weights
    top = logits.topk(5, dim=1).indices
    for k in (1, 5):
        expected = 100.0 * (top[:, :k] == labels[:, None]).any(dim=1).float().mean().item()
        assert result[f"itc_top{k}"] == pytest.approx(expected)
    assert "itm_top1" not in result and result["itm_rerank_k"] == 0
    assert (result["num_images"], result["num_classes"]) == (40, 7)


class KnownEmbeddings(nn.Module):
    """Text: the class word's basis vector plus a shared 0.1 * e3 per other word, normalized.
    Image: its first pixel row is its embedding; pixel [1, 0, 0] is its true class (for the ITM oracle)."""

    def __init__(self, classes: list[str], fused: bool) -> None:
        super().__init__()
        self.classes = classes
        self.has_fusion = fused
        self.config = SimpleNamespace(text=SimpleNamespace(max_length=8))
        self.scale = 1.0

    def logit_scale(self) -> Tensor:
        return torch.tensor(self.scale)

    def tokenizer(self, texts: list[str], max_length: int) -> dict[str, Tensor]:
        rows = [[self.classes.index(w) if w in self.classes else 3 for w in text.split()] for text in texts]
        length = max(len(row) for row in rows)
        ids = torch.tensor([row + [0] * (length - len(row)) for row in rows])
        mask = torch.tensor([[True] * len(row) + [False] * (length - len(row)) for row in rows])
        return {"input_ids": ids, "attention_mask": mask}

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[EncoderOutput, Tensor]:
        vectors = F.one_hot(input_ids, 4).float()
        vectors[..., 3] *= 0.1
        emb = F.normalize((vectors * attention_mask[..., None]).sum(1), dim=-1)
        # token 0 carries the class id (the oracle reads it)
        class_id = (input_ids * (input_ids < 3)).amax(dim=1).float()
        tokens = class_id[:, None, None].expand(-1, input_ids.shape[1], 1)
        return EncoderOutput(tokens, attention_mask, emb), emb

    def image_features(self, images: Tensor) -> tuple[EncoderOutput, Tensor]:
        tokens = images[:, 1, :1, :1].flatten(1)[:, None, :]
        return EncoderOutput(tokens, torch.ones(len(images), 1, dtype=torch.bool), tokens[:, 0]), \
            F.normalize(images[:, 0, 0, :], dim=-1)

    def image_context(self, image_out: EncoderOutput) -> Any:
        return SimpleNamespace(select=lambda index: image_out.tokens[index])

    def itm_logits_from(self, text_out: EncoderOutput, context: Any, index: Tensor) -> Tensor:
        match = (text_out.tokens[:, 0, 0] == context.select(index)[:, 0, 0]).float()
        return torch.stack([1 - match, match], dim=1)


def known_image(vector: list[float], label: int) -> Tensor:
    image = torch.zeros(3, 4, 4)
    image[0, 0] = torch.tensor(vector)
    image[1, 0, 0] = label
    return image


KNOWN = [  # (embedding, true class, ITC rank of the true class)
    ([1.0, 0.1, 0.0, 0.0], 0, 0),
    ([0.1, 1.0, 0.0, 0.0], 1, 0),
    ([0.0, 0.2, 1.0, 0.0], 2, 0),
    ([1.0, 0.9, 0.0, 0.0], 1, 1),   # dog scores second
    ([1.0, 0.0, 0.9, 0.0], 2, 1),   # bird scores second
    ([1.0, 0.5, 0.0, 0.0], 2, 2),   # bird scores last
]


@pytest.mark.parametrize("fused", [False, True])
def test_known_embeddings_give_expected_accuracy(fused: bool) -> None:
    classes = ["cat", "dog", "bird"]
    model = KnownEmbeddings(classes, fused)
    images = [known_image(vector, label) for vector, label, _ in KNOWN]
    labels: list[int | str] = [classes[label] for _, label, _ in KNOWN]  # names are accepted too
    result = evaluate_zeroshot(model, LabelledImages(images, labels), None, classes, ["a photo of {}", "{}"],
                               batch_size=4, precision="fp32", progress=False, itm_rerank_k=2)
    assert result["itc_top1"] == pytest.approx(100 * 3 / 6)
    assert result["itc_top5"] == 100.0  # three classes: top-5 holds all of them
    if fused:
        # The oracle ITM puts the true class first whenever it is among the top-2 ITC classes.
        assert result["itm_top1"] == pytest.approx(100 * 5 / 6)
        assert result["itm_rerank_k"] == 2
    else:
        assert "itm_top1" not in result and result["itm_rerank_k"] == 0


@pytest.mark.parametrize(("score", "scale", "top1"), [
    ("itm", 100.0, 100 * 5 / 6),            # the oracle alone
    ("itm_logit", 100.0, 100 * 5 / 6),      # its match logit: the same order
    ("itm+itc", 100.0, 100 * 5 / 6),        # + a cosine (< 1): the oracle's +-1 log-odds still decide
    ("itm+itc_logit", 1.0, 100 * 5 / 6),    # + the logit at scale 1: the same
    ("itm+itc_logit", 100.0, 100 * 3 / 6),  # + the logit at scale 100: ITC decides, as ITC ranked
])
def test_rescoring_rules_combine_the_match_head_with_itc(score: str, scale: float, top1: float) -> None:
    classes = ["cat", "dog", "bird"]
    model = KnownEmbeddings(classes, fused=True)
    model.scale = scale
    images = [known_image(vector, label) for vector, label, _ in KNOWN]
    result = evaluate_zeroshot(model, LabelledImages(images, [k[1] for k in KNOWN]), None, classes,
                               ["a photo of {}", "{}"], batch_size=4, precision="fp32", progress=False,
                               itm_rerank_k=2, score=score)
    assert result["itm_top1"] == pytest.approx(top1)
    assert result["itm_score"] == score
    assert result["itc_top1"] == pytest.approx(100 * 3 / 6)


def test_bad_zero_shot_inputs_are_user_errors() -> None:
    classes = ["cat", "dog", "bird"]
    model = KnownEmbeddings(classes, fused=True)
    split = LabelledImages([known_image([1.0, 0.0, 0.0, 0.0], 0)], ["cat"])
    with pytest.raises(UserError, match="has no '\\{\\}'"):
        zeroshot_classifier(model, classes, ["a photo"])
    with pytest.raises(UserError, match="label 'zebra'"):
        evaluate_zeroshot(model, LabelledImages(split.images, ["zebra"]), None, classes, progress=False)
    with pytest.raises(UserError, match="itm_rerank_k=4"):
        evaluate_zeroshot(model, split, None, classes, itm_rerank_k=4, progress=False)
    with pytest.raises(UserError, match="score: 'itc' is not one of itm, "):
        evaluate_zeroshot(model, split, None, classes, itm_rerank_k=2, score="itc", progress=False)
    with pytest.raises(UserError, match="1 images and 2 labels"):
        evaluate_zeroshot(model, LabelledImages(split.images, ["cat", "dog"]), None, classes, progress=False)


def test_details_give_per_class_accuracy_predictions_and_prompts() -> None:
    classes = ["cat", "dog", "bird"]
    images = [known_image(vector, label) for vector, label, _ in KNOWN]
    result = evaluate_zeroshot(KnownEmbeddings(classes, fused=True), LabelledImages(images, [k[1] for k in KNOWN]),
                               None, classes, ["a photo of {}", "{}"], batch_size=4, progress=False, itm_rerank_k=2,
                               details=True)
    assert result["templates"] == ["a photo of {}", "{}"]
    assert result["itm_prompts"] == ["a photo of cat", "a photo of dog", "a photo of bird"]
    per_class = result["per_class"]
    assert [per_class[c]["num_images"] for c in classes] == [1, 2, 3]
    assert [per_class[c]["itc_top1"] for c in classes] == pytest.approx([100.0, 50.0, 100 / 3])
    assert [per_class[c]["itm_top1"] for c in classes] == pytest.approx([100.0, 100.0, 200 / 3])
    assert [(p["label"], p["itc"], p["itm"]) for p in result["predictions"]] == [
        ("cat", "cat", "cat"), ("dog", "dog", "dog"), ("bird", "bird", "bird"),
        ("dog", "cat", "dog"), ("bird", "cat", "bird"), ("bird", "cat", "cat")]
    plain = evaluate_zeroshot(KnownEmbeddings(classes, fused=False), LabelledImages(images, [k[1] for k in KNOWN]),
                              None, classes, ["{}"], batch_size=4, progress=False)
    assert "per_class" not in plain and "predictions" not in plain  # details are asked for


@pytest.mark.parametrize("where", ["eval.score", "tasks.coco.scores", "tasks.in1k.scores", "score"])
def test_a_bad_re_rank_score_names_its_key_in_one_line(where: str) -> None:
    """Every place a re-rank score is given (retrieval, both benchmark tasks, zero-shot) shares one check and
    one error line."""
    from vlp.benchmark.retrieval import load_retrieval_task
    from vlp.benchmark.suite import RetrievalTask, ZeroShotTask
    from vlp.benchmark.zeroshot import load_zeroshot_task
    from vlp.config.schema import EvalConfig
    from vlp.eval.retrieval import evaluate_retrieval

    classes = ["cat", "dog", "bird"]
    model = KnownEmbeddings(classes, fused=True)
    calls = {
        "eval.score": lambda: evaluate_retrieval(model, None, None, EvalConfig(score="itm+itm"), progress=False),
        "tasks.coco.scores": lambda: load_retrieval_task("coco", RetrievalTask(type="retrieval", scores=("itm", "itm+itm"))),
        "tasks.in1k.scores": lambda: load_zeroshot_task("in1k", ZeroShotTask(type="zeroshot", scores=("itm+itm",))),
        "score": lambda: evaluate_zeroshot(model, LabelledImages([known_image([1.0, 0, 0, 0], 0)], ["cat"]), None,
                                           classes, itm_rerank_k=2, score="itm+itm", progress=False),
    }
    with pytest.raises(UserError) as caught:
        calls[where]()
    message = str(caught.value)
    assert message.startswith(f"{where}: 'itm+itm' is not one of itm, itm_logit, itm+itc, itm+itc_logit")
    assert "\n" not in message
