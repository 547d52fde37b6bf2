"""VQA v2 accuracy (official normalization, leave-one-out averaging), soft targets, head, loss, eval loop."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.errors import UserError
from vlp.eval.vqa import (
    AnswerVocab,
    evaluate_vqa,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
    vqa_soft_score,
)
from vlp.losses import vqa_loss
from vlp.models import VQAHead, VQAModel
from vlp.types import EncoderOutput, FusionOutput


def official_loop(prediction: str, answers: list[str]) -> float:
    """The official averaging written out: for each human answer, compare against the other nine."""
    scores = []
    for left_out in range(len(answers)):
        others = answers[:left_out] + answers[left_out + 1:]
        scores.append(min(1.0, sum(other == prediction for other in others) / 3))
    return sum(scores) / len(scores)


@pytest.mark.parametrize(("text", "expected"), [
    ("yes, it is", "yes it is"),        # a mark next to a space is deleted
    ("red/blue", "red blue"),           # a mark inside a word becomes a space
    ("1,000", "1000"),                  # a comma between digits: every mark is deleted
    ("(a/b) 1,5", "ab 15"),
    ("3.5", "3.5"),                     # a period before a digit stays
    ("yes.", "yes"),                    # other periods go
    ("don't", "don't"),                 # apostrophes are not punctuation here
    ("what?!", "what  "),
])
def test_process_punctuation(text: str, expected: str) -> None:
    assert process_punctuation(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("Two dogs", "2 dogs"), ("none", "0"), ("ten", "10"), ("the cat", "cat"), ("a an the", ""),
    ("An Apple", "apple"), ("dont know", "don't know"), ("Im", "im"), ("somebody'd", "somebodyd"),
])
def test_process_digit_article(text: str, expected: str) -> None:
    assert process_digit_article(text) == expected


def test_normalize_answer_chains_all_rules() -> None:
    assert normalize_answer(" The Two dogs.\n") == "2 dogs"
    assert normalize_answer("Yes, they dont") == "yes they don't"


@pytest.mark.parametrize(("matches", "expected"),
                         [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_averaging(matches: int, expected: float) -> None:
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("2", answers) == pytest.approx(expected)
    assert vqa_accuracy("2", answers) == pytest.approx(official_loop("2", answers))


def test_random_answers_match_the_official_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    pool = ["yes", "no", "2", "red"]
    for _ in range(50):
        answers = [pool[int(i)] for i in torch.randint(0, 4, (10,), generator=generator)]
        prediction = pool[int(torch.randint(0, 4, (1,), generator=generator))]
        assert vqa_accuracy(prediction, answers) == pytest.approx(official_loop(prediction, answers))


def test_normalization_applies_only_when_humans_disagree() -> None:
    # Disagreeing humans: both sides normalized (number words, articles, contractions, punctuation).
    assert vqa_accuracy("2", ["two"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("a dog", ["dog"] * 4 + ["cat"] * 6) == 1.0
    assert vqa_accuracy("don't", ["dont"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("yes.", ["yes"] * 2 + ["no"] * 8) == pytest.approx(0.6)
    # Unanimous humans: compared as given (after stripping whitespace), as the official script does.
    assert vqa_accuracy("2", ["two"] * 10) == 0.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    with pytest.raises(UserError, match="at least one human answer"):
        vqa_accuracy("yes", [])


def test_soft_scores() -> None:
    assert [vqa_soft_score(count) for count in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]


QUESTIONS: list[dict[str, Any]] = [
    {"question_id": 1, "image": "0", "question": "how many", "answer": ["Two", "2", "2", "yes", "nope"],
     "answer_type": "number"},
    {"question_id": 2, "image": "1", "question": "is it", "answer": ["yes"] * 6 + ["no"] * 4,
     "answer_type": "yes/no"},
    {"question_id": 3, "image": "2", "question": "what color",
     "answer": ["red"] * 2 + ["the red"] + ["blue"] * 7, "answer_type": "other"},
]


def test_answer_vocab_build_targets_and_save(tmp_path: Any) -> None:
    vocab = AnswerVocab.build(QUESTIONS, top_n=4)
    # counts: yes 7, blue 7, no 4, red 3, 2 3 -> ties broken alphabetically
    assert vocab.answers == ["blue", "yes", "no", "2"]
    assert vocab.index == {"blue": 0, "yes": 1, "no": 2, "2": 3}
    target = vocab.targets(QUESTIONS[0]["answer"])  # "two" normalizes to "2": three annotators
    assert target.tolist() == pytest.approx([0.0, 0.3, 0.0, 0.9])
    assert vocab.targets(["red"] * 5).tolist() == [0.0] * 4
    vocab.save(tmp_path / "answers.json")
    assert AnswerVocab.load(tmp_path / "answers.json").answers == vocab.answers
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="bad.json"):
        AnswerVocab.load(tmp_path / "bad.json")


def test_vqa_head_matches_vilt_layout() -> None:
    head = VQAHead(8, 5, hidden_mult=2)
    first, norm, act, last = head.classifier
    assert isinstance(first, nn.Linear) and isinstance(norm, nn.LayerNorm) and isinstance(last, nn.Linear)
    assert isinstance(act, nn.GELU)
    assert (first.in_features, first.out_features, last.out_features) == (8, 16, 5)
    pooled = torch.randn(3, 8)
    expected = last(F.gelu(F.layer_norm(first(pooled), (16,), norm.weight, norm.bias)))
    torch.testing.assert_close(head(pooled), expected)


def test_vqa_loss_is_bce_summed_over_answers_averaged_over_batch() -> None:
    logits, targets = torch.randn(4, 6), torch.rand(4, 6)
    expected = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / 4
    torch.testing.assert_close(vqa_loss(logits, targets), expected)


class StandIn(nn.Module):
    """Fusion pooled output = a one-hot of the image's id (pixel [0, 0, 0]) over ``width`` slots."""

    def __init__(self, width: int, fused: bool = True) -> None:
        super().__init__()
        self.width = width
        self.has_fusion = fused
        self.fusion = SimpleNamespace(out_dim=width)
        self.config = SimpleNamespace(text=SimpleNamespace(max_length=8))
        self.scale = nn.Parameter(torch.ones(()))

    def tokenizer(self, texts: list[str], max_length: int) -> dict[str, Tensor]:
        return {"input_ids": torch.ones(len(texts), 2, dtype=torch.long),
                "attention_mask": torch.ones(len(texts), 2, dtype=torch.bool)}

    def image_features(self, images: Tensor) -> tuple[EncoderOutput, Tensor]:
        tokens = images[:, 0, :1, :1].flatten(1)[:, None, :]
        return EncoderOutput(tokens, torch.ones(len(images), 1, dtype=torch.bool), tokens[:, 0]), tokens[:, 0]

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[EncoderOutput, Tensor]:
        tokens = torch.zeros(*input_ids.shape, 1)
        return EncoderOutput(tokens, attention_mask, tokens[:, 0]), tokens[:, 0]

    def fuse(self, text_out: EncoderOutput, image_out: EncoderOutput, pooled_only: bool = False) -> FusionOutput:
        pooled = self.scale * F.one_hot(image_out.tokens[:, 0, 0].long(), self.width).float()
        return FusionOutput(text_out.tokens, image_out.tokens, pooled)


def test_vqa_model_needs_fusion_and_uses_the_pooled_output() -> None:
    with pytest.raises(UserError, match="has no fusion block: VQA needs a fused model"):
        VQAModel(StandIn(4, fused=False), num_answers=3)
    vqa = VQAModel(StandIn(4), num_answers=3)
    images = torch.zeros(2, 3, 2, 2)
    images[1, 0, 0, 0] = 2
    ids, mask = torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.bool)
    expected = vqa.head(F.one_hot(torch.tensor([0, 2]), 4).float())
    torch.testing.assert_close(vqa(images, ids, mask), expected)


def test_vqa_head_can_read_the_image_tower_too() -> None:
    stand_in = StandIn(4)
    stand_in.image_encoder = SimpleNamespace(embed_dim=1)  # type: ignore[assignment]  # pooled = pixel [0, 0, 0]
    vqa = VQAModel(stand_in, num_answers=3, head_input="fused+image")
    assert vqa.head.classifier[0].in_features == 4 + 1
    images = torch.zeros(2, 3, 2, 2)
    images[1, 0, 0, 0] = 2
    ids, mask = torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.bool)
    read = torch.cat([F.one_hot(torch.tensor([0, 2]), 4).float(), torch.tensor([[0.0], [2.0]])], dim=1)
    torch.testing.assert_close(vqa(images, ids, mask), vqa.head(read))
    with pytest.raises(UserError, match="vqa.head_input: unknown value 'image'"):
        VQAModel(stand_in, num_answers=3, head_input="image")


def test_evaluate_vqa_predictions_and_accuracy() -> None:
    vocab = AnswerVocab(["2", "yes", "blue"])
    vqa = VQAModel(StandIn(3), num_answers=3)
    vqa.head = nn.Identity()  # type: ignore[assignment]  # logits = one-hot of the image id
    questions = [*QUESTIONS, {"question_id": 4, "image": "1", "question": "test split"}]

    def load_image(name: str) -> Tensor:
        return torch.full((3, 2, 2), float(name))

    predictions, metrics = evaluate_vqa(vqa, questions, load_image, vocab, batch_size=3, precision="fp32",
                                        progress=False)
    assert predictions == [{"question_id": 1, "answer": "2"}, {"question_id": 2, "answer": "yes"},
                           {"question_id": 3, "answer": "blue"}, {"question_id": 4, "answer": "yes"}]
    # Question 1 has 5 human answers, 3 of them "2" once normalized: (3 * 2/3 + 2 * 1) / 5.
    expected = [vqa_accuracy("2", QUESTIONS[0]["answer"]), 1.0, 1.0]
    assert expected[0] == pytest.approx(0.8)
    assert metrics["num_questions"] == 3 and metrics["precision"] == "fp32"
    assert metrics["overall"] == pytest.approx(100 * sum(expected) / 3)
    assert metrics["per_type"] == pytest.approx({"number": 80.0, "yes/no": 100.0, "other": 100.0})
    assert vqa.training
