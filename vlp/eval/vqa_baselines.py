"""Answer priors that never look at the image, scored beside every VQA accuracy.

A VQA model can score well by answering from the question alone ("how many ..." -> the most common count,
"is there ..." -> "yes"). Two deterministic baselines, fitted on the training questions without any
training, show how much of a score the image accounts for:

- ``question_only``: each question string is answered with its most frequent training answer; a question
  string never seen in training gets its answer type's most frequent training answer, and, when its
  answer type is unknown too, the overall most frequent one.
- ``majority_answer``: every question is answered with the overall most frequent training answer.

Answers are counted over every human answer of every training question after the official answer
normalization (``normalize_answer``), ties broken alphabetically; predictions are scored with the same
official accuracy as the model's. Question strings are compared after ``normalize_question``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlp.errors import UserError

__all__ = ["normalize_question", "AnswerPriors", "vqa_baselines", "read_vqa_answers"]

_SPACE = re.compile(r"\s+")
_TRAILING_MARKS = re.compile(r"[\s?]+$")


def normalize_question(question: str) -> str:
    """The key under which question strings are counted: lowercased, runs of whitespace collapsed to one
    space, leading/trailing whitespace and trailing question marks dropped ("Is there a  red circle ?"
    and "is there a red circle?" are one question); other punctuation is kept."""
    return _TRAILING_MARKS.sub("", _SPACE.sub(" ", question.lower()).strip())


def _most_frequent(counts: Counter[str]) -> str:
    return min(counts.items(), key=lambda item: (-item[1], item[0]))[0]


class AnswerPriors:
    """The most frequent normalized training answer per question string, per answer type, and overall."""

    def __init__(self, by_question: Mapping[str, str], by_type: Mapping[str, str], overall: str,
                 num_questions: int) -> None:
        self.by_question, self.by_type, self.overall = dict(by_question), dict(by_type), overall
        self.num_questions = num_questions

    @classmethod
    def fit(cls, questions: Iterable[Mapping[str, Any]]) -> AnswerPriors:
        """Count the human answers of ``questions`` (vlp VQA records: "question", "answer", "answer_type")."""
        from vlp.eval.vqa import _human_answers, normalize_answer

        per_question: dict[str, Counter[str]] = {}
        per_type: dict[str, Counter[str]] = {}
        overall: Counter[str] = Counter()
        count = 0
        for record in questions:
            answers = [normalize_answer(answer) for answer in _human_answers(record)]
            if not answers:
                continue
            count += 1
            per_question.setdefault(normalize_question(str(record["question"])), Counter()).update(answers)
            if record.get("answer_type"):
                per_type.setdefault(str(record["answer_type"]), Counter()).update(answers)
            overall.update(answers)
        if not overall:
            raise UserError("the VQA training questions have no human answers: no question-only baseline")
        return cls({q: _most_frequent(c) for q, c in per_question.items()},
                   {t: _most_frequent(c) for t, c in per_type.items()}, _most_frequent(overall), count)

    def question_only(self, record: Mapping[str, Any]) -> str:
        """The answer of the question-only baseline (with the answer-type and overall fallbacks)."""
        answer = self.by_question.get(normalize_question(str(record["question"])))
        if answer is not None:
            return answer
        return self.by_type.get(str(record.get("answer_type") or ""), self.overall)

    def seen(self, record: Mapping[str, Any]) -> bool:
        return normalize_question(str(record["question"])) in self.by_question


def _flat(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    return {"overall": metrics["overall"], **metrics["per_type"]}


def vqa_baselines(priors: AnswerPriors, questions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The baselines on ``questions``, scored like the model's answers (``vqa_metrics``), as two keys to
    merge into a VQA result: ``baselines`` maps each baseline to its accuracies in percent
    (``{"question_only": {"overall", <answer type>: ...}, "majority_answer": {...}}``, nothing else, so a
    report can render every entry), ``baselines_info`` says what they were fitted on: the majority answer,
    the number of training questions, and how many evaluated question strings training never had."""
    from vlp.eval.distributed import vqa_metrics

    question_only = [{"answer": priors.question_only(record)} for record in questions]
    majority = [{"answer": priors.overall}] * len(questions)
    return {"baselines": {"question_only": _flat(vqa_metrics(questions, question_only)),
                          "majority_answer": _flat(vqa_metrics(questions, majority))},
            "baselines_info": {"majority_answer": priors.overall, "train_questions": priors.num_questions,
                               "unseen_questions": sum(not priors.seen(record) for record in questions)}}


def read_vqa_answers(path: str | Path) -> list[dict[str, Any]]:
    """The questions, human answers and answer types of a vlp VQA file (JSON list or JSONL), without
    resolving or checking its images: all the baselines need from the training split."""
    from vlp.data.datasets import read_json_records

    path = Path(path)
    records: list[dict[str, Any]] = []
    for location, record in read_json_records(path):
        if not isinstance(record.get("question"), str):
            raise UserError(f"{path}: {location}: missing or non-string 'question'")
        answers = record.get("answer", record.get("answers"))
        answers = [answers] if isinstance(answers, str) else answers or []
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise UserError(f"{path}: {location}: 'answer' must be a list of strings")
        records.append({"question": record["question"], "answer": answers,
                        "answer_type": str(record.get("answer_type") or "")})
    return records
