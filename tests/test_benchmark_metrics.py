"""The benchmark metrics as plain functions (hand-made cases and brute-force references), the linear probe and
its weight-decay search, and the suite file's checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlp.benchmark import load_suite
from vlp.benchmark.linear_probe import WEIGHT_DECAYS, search_weight_decay, train_probe
from vlp.benchmark.scoring import choice_correct, group_accuracy, winoground_scores
from vlp.benchmark.zeroshot import classification_metrics
from vlp.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_winoground_scores_on_hand_made_cases() -> None:
    # scores[e, caption, image]; caption c belongs to image c
    cases = torch.tensor([
        [[0.9, 0.1], [0.2, 0.8]],  # all right: text, image, group
        [[0.9, 0.8], [0.7, 0.6]],  # each image prefers its caption (0.9>0.7, 0.6>0.8? no) -> text wrong;
        # caption 0 prefers image 0 (0.9>0.8), caption 1 prefers image 0 (0.7>0.6) -> image wrong
        [[0.5, 0.4], [0.1, 0.2]],  # text: 0.5>0.1 and 0.2>0.4? no; image: 0.5>0.4 and 0.2>0.1 -> image only
        [[0.5, 0.1], [0.4, 0.45]],  # text: 0.5>0.4 and 0.45>0.1; image: 0.5>0.1 and 0.45>0.4 -> all right
        [[0.3, 0.3], [0.1, 0.9]],  # a tie (c0: i0 = i1): image wrong; text: 0.3>0.1 and 0.9>0.3 -> text only
        [[0.2, 0.9], [0.8, 0.1]],  # everything swapped: all wrong
    ])
    scores = winoground_scores(cases)
    assert scores["text"].tolist() == [True, False, False, True, True, False]
    assert scores["image"].tolist() == [True, False, True, True, False, False]
    assert scores["group"].tolist() == [True, False, False, True, False, False]


def test_choice_accuracy_counts_ties_as_wrong() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.2], [0.5, 0.5, 0.1], [0.1, 0.6, 0.0], [0.3, 0.2, 0.29]])
    assert choice_correct(scores).tolist() == [True, False, False, True]
    assert choice_correct(scores[:, [1, 0]], true_option=1).tolist() == [True, False, False, True]


def test_sugarcrepe_accuracy_equals_a_brute_force_count() -> None:
    generator = torch.Generator().manual_seed(0)
    pos, neg = torch.rand(200, generator=generator), torch.rand(200, generator=generator)
    neg[:10] = pos[:10]  # ties
    correct = choice_correct(torch.stack([pos, neg], dim=1))
    assert correct.double().mean().item() == sum(1 for p, n in zip(pos.tolist(), neg.tolist()) if p > n) / 200


def test_group_macro_accuracy_with_min_count_and_exclusions() -> None:
    correct = torch.tensor([True, False, True, True, False, True, True])
    groups = ["on", "on", "on", "under", "under", "near", "by"]
    macro, per_group, counted = group_accuracy(correct, groups)
    assert per_group == pytest.approx({"on": 200 / 3, "under": 50.0, "near": 100.0, "by": 100.0})
    assert macro == pytest.approx((200 / 3 + 50 + 100 + 100) / 4) and counted == 4
    macro, per_group, counted = group_accuracy(correct, groups, min_count=2, exclude=["under"])
    assert per_group == pytest.approx({"on": 200 / 3}) and counted == 1 and macro == pytest.approx(200 / 3)


def test_classification_metrics_equal_sklearn_style_balanced_accuracy() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 7, generator=generator)
    labels = torch.randint(0, 7, (300,), generator=generator)
    labels[labels == 6] = 5  # a class with no images does not count in the per-class mean
    ranks = (logits > logits.gather(1, labels[:, None])).sum(dim=1)
    metrics = classification_metrics(ranks, labels, 7)
    predicted = logits.argmax(dim=1)
    recalls = [float((predicted[labels == c] == c).double().mean()) for c in range(6)]
    top5 = logits.topk(5, dim=1).indices
    assert metrics["top1"] == pytest.approx(100.0 * float((predicted == labels).double().mean()))
    assert metrics["top5"] == pytest.approx(100.0 * float((top5 == labels[:, None]).any(dim=1).double().mean()))
    assert metrics["mean_per_class_recall"] == pytest.approx(100.0 * np.mean(recalls))


def test_weight_decay_search_follows_clip_benchmarks_schedule() -> None:
    assert len(WEIGHT_DECAYS) == 97 and WEIGHT_DECAYS[0] == pytest.approx(1e-6) and WEIGHT_DECAYS[-1] == pytest.approx(100)
    peak = 37  # a unimodal validation accuracy peaking at index 37 (wd ~ 3.2e-3)
    visited: list[int] = []

    def accuracy(decay: float) -> float:
        index = WEIGHT_DECAYS.index(decay)
        visited.append(index)
        return 1.0 - abs(index - peak) / 100

    best, tried = search_weight_decay(accuracy)
    assert best == WEIGHT_DECAYS[peak]
    # the 7-point grid, then left/right of the running peak at steps 8, 4, 2, 1 (each value trained once)
    assert visited == [0, 16, 32, 48, 64, 80, 96, 24, 40, 36, 44, 34, 38, 35, 37]
    assert [d for d, _ in tried] == [WEIGHT_DECAYS[i] for i in visited]


def test_linear_probe_separates_separable_features_and_not_random_labels() -> None:
    generator = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=1)
    labels = torch.arange(4).repeat_interleave(30)
    features = torch.nn.functional.normalize(centers[labels] + 0.05 * torch.randn(120, 16, generator=generator), dim=1)
    probe = train_probe(features[::2], labels[::2], 4, weight_decay=0.0, lr=0.1, epochs=10, batch_size=16, seed=0)
    with torch.no_grad():
        assert (probe(features[1::2]).argmax(dim=1) == labels[1::2]).all()
        shuffled = labels[torch.randperm(120, generator=generator)]
        probe = train_probe(features[::2], shuffled[::2], 4, 0.0, 0.1, 10, 16, 0)
        accuracy = (probe(features[1::2]).argmax(dim=1) == shuffled[1::2]).double().mean().item()
    assert accuracy < 0.6  # random labels of held-out features stay near chance (0.25)
    again = train_probe(features[::2], labels[::2], 4, 0.0, 0.1, 10, 16, 0)
    assert torch.equal(again.weight, train_probe(features[::2], labels[::2], 4, 0.0, 0.1, 10, 16, 0).weight)


# ------------------------------------------------------------------------------------------ suite files
def test_shipped_suites_load_with_placeholders() -> None:
    for name in ("retrieval", "zeroshot", "compositionality", "linear_probe", "synthetic"):
        suite = load_suite(ROOT / "configs/benchmarks" / f"{name}.yaml")
        assert suite.name == name and suite.tasks


def test_suite_typos_and_bad_sets_fail_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps({"tasks": {"flickr": {"type": "retrieval", "data": "x.json"}}}))
    cases = {
        ("tasks.flickr.k_tset=4",): "did you mean 'tasks.flickr.k_test'",
        ("tasks.flikr.data=y",): "did you mean 'tasks.flickr'",
        ("defaults.batchsize=4",): "did you mean 'defaults.batch_size'",
        ("tasks.flickr.precision=fp16",): "one of auto, fp32, bf16",
        ("tasks.flickr.format=csv",): "one of karpathy, wds",
        ("tasks.flickr.type=retreival",): "did you mean 'retrieval'",
    }
    for overrides, message in cases.items():
        with pytest.raises(UserError, match=message):
            load_suite(path, list(overrides))
    assert load_suite(path, ["tasks.flickr.k_test=4", "defaults.batch_size=8"]).tasks["flickr"].batch_size == 8
