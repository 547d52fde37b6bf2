"""VQA evaluation sharded over the ranks of a process group (retrieval shards in ``evaluate_retrieval``).

Questions are dealt out in contiguous blocks; the predictions are gathered and scored once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from vlp.collectives import gather_objects, rank_and_world, shard_rows
from vlp.eval.retrieval import resolve_device
from vlp.precision import DEFAULT_PRECISION, resolve_precision

__all__ = ["evaluate_vqa_sharded", "vqa_metrics"]


# ------------------------------------------------------------------------------------------ VQA
def vqa_metrics(questions: Sequence[Mapping[str, Any]], predictions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``evaluate_vqa``'s metrics from its predictions (matched to ``questions`` by position)."""
    from vlp.eval.vqa import _human_answers, vqa_accuracy

    scores: list[float] = []
    per_type: dict[str, list[float]] = {}
    for record, prediction in zip(questions, predictions, strict=True):
        humans = _human_answers(record)
        if not humans:
            continue
        value = vqa_accuracy(str(prediction["answer"]), humans)
        scores.append(value)
        if record.get("answer_type"):
            per_type.setdefault(str(record["answer_type"]), []).append(value)

    def percent(values: list[float]) -> float:
        return 100.0 * sum(values) / len(values)

    return {"overall": percent(scores) if scores else None,
            "per_type": {kind: percent(values) for kind, values in sorted(per_type.items())},
            "per_type_count": {kind: len(values) for kind, values in sorted(per_type.items())},
            "num_questions": len(scores)}


def evaluate_vqa_sharded(vqa_model: Any, questions: Sequence[Mapping[str, Any]],
                         load_image: Callable[[Any], Tensor], vocab: Any, batch_size: int = 64,
                         device: str | torch.device | None = None, progress: bool = True,
                         precision: str = DEFAULT_PRECISION,
                         num_workers: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``evaluate_vqa`` with the questions split over the ranks; the same result on every rank (a collective)."""
    from vlp.eval.vqa import evaluate_vqa

    rank, world = rank_and_world()
    if world == 1 or len(questions) < world:
        return evaluate_vqa(vqa_model, questions, load_image, vocab, batch_size, device, progress and rank == 0,
                            precision, num_workers)
    rows = shard_rows(len(questions), rank, world)
    local, _ = evaluate_vqa(vqa_model, questions[rows.start:rows.stop], load_image, vocab, batch_size, device,
                            progress and rank == 0, precision, num_workers)
    predictions = [prediction for part in gather_objects(local) for prediction in part]
    resolved = resolve_precision(precision, resolve_device(vqa_model, device))
    return predictions, {**vqa_metrics(questions, predictions), "precision": resolved}
