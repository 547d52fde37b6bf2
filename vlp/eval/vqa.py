"""VQA v2: the official answer normalization and accuracy, the answer vocabulary and the evaluation loop.

Normalization and accuracy follow the official evaluation script (GT-Vision-Lab/VQA, vqaEval.py); the soft
targets follow ViLT/METER, as do the head (``vlp.models.VQAModel``) and the loss (``vlp.losses.vqa_loss``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vlp.errors import UserError
from vlp.eval.retrieval import max_text_length, resolve_device
from vlp.precision import DEFAULT_PRECISION, autocast_context, resolve_precision

if TYPE_CHECKING:
    from vlp.models.vqa_model import VQAModel

__all__ = ["normalize_answer", "vqa_accuracy", "vqa_soft_score", "AnswerVocab", "evaluate_vqa"]

# The official table, quirks included ("somebody'd" -> "somebodyd"; capitalized keys never match the
# lowercased text).
_CONTRACTIONS = dict(pair.split(":") for pair in """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd
howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've
it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've
mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've
oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't
shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't shouldnt've:shouldn't've
shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've somebody'dve:somebody'd've
somebodyll:somebody'll somebodys:somebody's someoned:someone'd someoned've:someone'd've
someone'dve:someone'd've someonell:someone'll someones:someone's somethingd:something'd
somethingd've:something'd've something'dve:something'd've somethingll:something'll thats:that's
thered:there'd thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd
theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't
wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're whats:what's
whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've
who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're whys:why's wont:won't
wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll
y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've
you'dve:you'd've youll:you'll youre:you're youve:you've
""".split())
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern verbatim: its "(?!<=\d)" is a lookahead, not a lookbehind, so it removes every
# period that is not followed by a digit ("3.5" keeps its period, "yes." loses it).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")


def process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: a mark next to a space (or any mark, once the text holds a comma between
    digits) is deleted; a mark inside a word becomes a space; then periods not before a digit go."""
    out = text
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in _PUNCTUATION:
        # The official test looks at the original text, not the partly cleaned one.
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out)


def process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lowercase, number words to digits, no articles, contractions fixed."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def _strip(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """The official normalization: whitespace, punctuation, then number words, articles and contractions."""
    return process_digit_article(process_punctuation(_strip(answer)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA v2 accuracy of one prediction against the human answers (usually 10), in [0, 1].

    As in the official script (vqaEval.py since its 2021 "processing answers bug" fix), all answers are
    stripped, and only when the human answers disagree are they and the prediction normalized (punctuation,
    number words, articles, contractions): the annotation files already hold normalized answers.
    For each human answer left out, accuracy = min(1, matches among the others / 3); the result is the mean.
    """
    if not answers:
        raise UserError("vqa_accuracy needs at least one human answer")
    predicted = _strip(prediction)
    humans = [_strip(answer) for answer in answers]
    if len(set(humans)) > 1:
        predicted = normalize_answer(predicted)
        humans = [normalize_answer(answer) for answer in humans]
    agree = [answer == predicted for answer in humans]
    matches = sum(agree)
    return sum(min(1.0, (matches - left_out) / 3) for left_out in agree) / len(humans)


def vqa_soft_score(count: int) -> float:
    """ViLT/METER's soft target for an answer given by ``count`` annotators: 0, .3, .6, .9, then 1."""
    if count < 0:
        raise ValueError(f"an answer count is >= 0; got {count}")
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def _human_answers(record: Mapping[str, Any]) -> list[str]:
    """A question's human answers: the VQA format's "answer" (list or string; docs/data.md), or a dataset row's "answers"."""
    answers = record.get("answer", record.get("answers")) or []
    return [answers] if isinstance(answers, str) else list(answers)


class AnswerVocab:
    """The answer classes: the ``top_n`` most frequent normalized training answers."""

    def __init__(self, answers: Sequence[str]) -> None:
        self.answers = list(answers)
        self.index = {answer: i for i, answer in enumerate(self.answers)}
        if len(self.index) != len(self.answers):
            raise UserError("answer vocabulary has duplicate answers")

    def __len__(self) -> int:
        return len(self.answers)

    @classmethod
    def build(cls, questions: Iterable[Mapping[str, Any]], top_n: int) -> AnswerVocab:
        """Count every human answer (normalized) of every question; ties break alphabetically."""
        if top_n < 1:
            raise UserError(f"vqa.num_answers must be >= 1; got {top_n}")
        counts = Counter(normalize_answer(answer) for record in questions
                         for answer in _human_answers(record))
        if not counts:
            raise UserError("the VQA training questions have no human answers to build the answer vocabulary")
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return cls([answer for answer, _ in ranked[:top_n]])

    def targets(self, answers: Sequence[str]) -> Tensor:
        """Soft target [num_answers] of one question's human answers (unknown answers drop out)."""
        target = torch.zeros(len(self.answers))
        for answer, count in Counter(normalize_answer(answer) for answer in answers).items():
            if answer in self.index:
                target[self.index[answer]] = vqa_soft_score(count)
        return target

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"answers": self.answers}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> AnswerVocab:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"{path}: cannot read the answer vocabulary ({error})") from error
        if not isinstance(data, dict) or not isinstance(data.get("answers"), list):
            raise UserError(f"{path}: an answer vocabulary is a JSON object with an 'answers' list")
        return cls([str(answer) for answer in data["answers"]])


class _QuestionImages(Dataset[tuple[Tensor, int]]):
    def __init__(self, questions: Sequence[Mapping[str, Any]], load_image: Callable[[Any], Tensor]) -> None:
        self.questions = questions
        self.load_image = load_image

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.load_image(self.questions[index]["image"]), index


def _percent(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values)


@torch.no_grad()
def evaluate_vqa(vqa_model: VQAModel, questions: Sequence[Mapping[str, Any]],
                 load_image: Callable[[Any], Tensor], vocab: AnswerVocab, batch_size: int = 64,
                 device: str | torch.device | None = None,
                 progress: bool = True, precision: str = DEFAULT_PRECISION,
                 num_workers: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Answer every question (the highest-scoring vocabulary answer) and score those with human answers.

    ``questions``: records in vlp's VQA format (docs/data.md); ``load_image(record["image"])`` returns the transformed image
    tensor. Returns (predictions [{"question_id", "answer"}], metrics {"overall": percent or None,
    "per_type": {answer_type: percent}, "num_questions": scored questions, "precision": what ``auto``
    resolved to}).
    """
    target = resolve_device(vqa_model, device)
    precision = resolve_precision(precision, target)
    autocast = autocast_context(precision, target)
    model = vqa_model.model
    loader = DataLoader(_QuestionImages(questions, load_image), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=target.type == "cuda")
    was_training = vqa_model.training
    vqa_model.eval()
    predictions: list[dict[str, Any]] = []
    scores: list[float] = []
    per_type: dict[str, list[float]] = {}
    try:
        for images, indices in tqdm(loader, desc="vqa", disable=not progress):
            records = [questions[int(i)] for i in indices]
            texts = [str(record["question"]) for record in records]
            tokens = model.tokenizer(texts, max_length=max_text_length(model))
            with autocast():
                logits = vqa_model(images.to(target), tokens["input_ids"].to(target),
                                   tokens["attention_mask"].to(target))
            for record, best in zip(records, logits.argmax(dim=-1).tolist()):
                answer = vocab.answers[best]
                predictions.append({"question_id": record["question_id"], "answer": answer})
                humans = _human_answers(record)
                if humans:
                    score = vqa_accuracy(answer, humans)
                    scores.append(score)
                    if record.get("answer_type"):
                        per_type.setdefault(str(record["answer_type"]), []).append(score)
    finally:
        vqa_model.train(was_training)
    metrics = {"overall": _percent(scores) if scores else None,
               "per_type": {kind: _percent(values) for kind, values in sorted(per_type.items())},
               "per_type_count": {kind: len(values) for kind, values in sorted(per_type.items())},
               "num_questions": len(scores), "precision": precision}
    return predictions, metrics
