"""The image-blind VQA baselines against a brute-force computation on a hand-made question set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vlp.errors import UserError
from vlp.eval.vqa import vqa_accuracy
from vlp.eval.vqa_baselines import AnswerPriors, normalize_question, read_vqa_answers, vqa_baselines


def q(question: str, answers: list[str], answer_type: str) -> dict[str, Any]:
    return {"question": question, "answer": answers, "answer_type": answer_type}


# "how many" is answered "2" by 14 annotators and "3" by 16 over its three spellings: "3" wins only when the
# spellings are counted as one question. "is there a cat" has a 10/10 tie, broken alphabetically ("no").
TRAIN = [
    q("How many dogs?", ["2"] * 7 + ["3"] * 3, "number"),
    q("how many  dogs", ["3"] * 8 + ["2"] * 2, "number"),
    q("how many dogs ?", ["2"] * 5 + ["3"] * 5, "number"),
    q("is there a cat?", ["yes"] * 10, "yes/no"),
    q("is there a cat?", ["no"] * 10, "yes/no"),
    q("is there a dog?", ["yes"] * 9 + ["no"], "yes/no"),
    q("what color is it?", ["red"] * 6 + ["blue"] * 4, "other"),
    q("what color is it?", ["Blue"] * 10, "other"),  # normalized to "blue" before counting
    q("no answers here?", [], "other"),  # not counted at all
]
TEST = [
    q("HOW MANY DOGS?", ["3"] * 6 + ["2"] * 4, "number"),
    q("is there a cat?", ["yes"] * 7 + ["no"] * 3, "yes/no"),
    q("is there a dog", ["no"] * 8 + ["yes"] * 2, "yes/no"),
    q("what color is it?", ["blue"] * 10, "other"),
    q("what shape is it?", ["blue"] * 2 + ["round"] * 8, "other"),  # unseen: the type's majority ("blue")
    q("is there a bird?", ["no"] * 10, "yes/no"),  # unseen: the type's majority ("yes", 19 vs 11)
    q("why?", ["because"] * 10, "mystery"),  # unseen, unknown type: the overall majority
]


def brute_force(train: list[dict[str, Any]], test: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Every answer re-counted from scratch for every question, in the plainest possible way."""
    def key(text: str) -> str:
        text = " ".join(text.lower().split())
        while text.endswith("?") or text.endswith(" "):
            text = text[:-1]
        return text

    def best(pool: list[str]) -> str:
        return sorted(set(pool), key=lambda a: (-pool.count(a), a))[0]

    everything = [a.lower() for t in train for a in t["answer"]]
    out: dict[str, dict[str, list[float]]] = {"question_only": {}, "majority_answer": {}}
    for record in test:
        same = [a.lower() for t in train if key(t["question"]) == key(record["question"]) for a in t["answer"]]
        typed = [a.lower() for t in train if t["answer_type"] == record["answer_type"] for a in t["answer"]]
        answer = best(same) if same else best(typed) if typed else best(everything)
        for name, prediction in (("question_only", answer), ("majority_answer", best(everything))):
            score = vqa_accuracy(prediction, record["answer"])
            out[name].setdefault("overall", []).append(score)
            out[name].setdefault(record["answer_type"], []).append(score)
    return {name: {k: 100 * sum(v) / len(v) for k, v in values.items()} for name, values in out.items()}


def test_normalize_question() -> None:
    assert normalize_question("  Is there a\tRed  circle ?? ") == "is there a red circle"
    assert normalize_question("is there a red circle") == "is there a red circle"
    assert normalize_question("what's that, then?") == "what's that, then"  # inner punctuation kept


def test_priors_pick_the_most_frequent_answer_with_fallbacks() -> None:
    priors = AnswerPriors.fit(TRAIN)
    assert priors.num_questions == 8  # the question without answers is not counted
    assert priors.by_question["how many dogs"] == "3"  # 16 vs 14 over three spellings of one question
    assert priors.by_question["is there a cat"] == "no"  # 10 vs 10: alphabetical
    assert priors.by_question["what color is it"] == "blue"  # 14 (4 + 10 "Blue") vs 6
    assert priors.by_type == {"number": "3", "yes/no": "yes", "other": "blue"}
    assert priors.overall == "yes"  # 19 yes, 16 "3", 14 "2", 14 blue, 11 no, 6 red
    answers = [priors.question_only(record) for record in TEST]
    assert answers == ["3", "no", "yes", "blue", "blue", "yes", "yes"]


def test_baselines_match_a_brute_force_computation() -> None:
    result = vqa_baselines(AnswerPriors.fit(TRAIN), TEST)
    expected = brute_force(TRAIN, TEST)
    assert set(result["baselines"]) == {"question_only", "majority_answer"}
    for name, values in expected.items():
        assert result["baselines"][name].keys() == values.keys()
        for kind, value in values.items():
            assert result["baselines"][name][kind] == pytest.approx(value), (name, kind)
    # by hand: "3" on 6x"3" scores 1; "no" on 3x"no" 0.9; "yes" on 2x"yes" 0.6; "blue" on 10x 1, on 2x 0.6;
    # "yes" on 10x"no" 0; "yes" on "because" 0
    assert result["baselines"]["question_only"]["yes/no"] == pytest.approx(100 * (0.9 + 0.6 + 0.0) / 3)
    assert result["baselines"]["question_only"]["overall"] == pytest.approx(100 * (1 + .9 + .6 + 1 + .6) / 7)
    assert result["baselines"]["majority_answer"]["yes/no"] == pytest.approx(100 * (1 + 0.6 + 0) / 3)
    assert result["baselines_info"] == {"majority_answer": "yes", "train_questions": 8, "unseen_questions": 3}


def test_baselines_on_synthetic_questions_match_brute_force() -> None:
    from vlp.data.synthetic import SyntheticScenes
    from vlp.data.vqa_data import synthetic_vqa

    train, test = synthetic_vqa(SyntheticScenes(60, split="train")), synthetic_vqa(SyntheticScenes(20, split="test"))
    result = vqa_baselines(AnswerPriors.fit(train), test)["baselines"]
    expected = brute_force(train, test)
    for name, values in expected.items():
        assert result[name] == pytest.approx(values)
    # the synthetic "is there ..." questions are half yes, half no: a question prior cannot reach 100
    assert result["question_only"]["yes/no"] < 90


def test_fit_needs_answers_and_files_are_checked(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no human answers"):
        AnswerPriors.fit([q("why?", [], "other")])
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"question_id": 1, "image": "missing.png", "question": "why?", "answer": "because"}]))
    assert read_vqa_answers(path) == [q("why?", ["because"], "")]  # images are not needed
    path.write_text(json.dumps([{"question_id": 1, "question": "why?", "answer": [3]}]))
    with pytest.raises(UserError, match="entry 0: .answer. must be a list of strings"):
        read_vqa_answers(path)
