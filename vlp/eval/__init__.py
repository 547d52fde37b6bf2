"""Evaluation: retrieval (ITC ranking + ITM re-ranking), VQA v2 accuracy, zero-shot classification.

Each module imports without the model package, e.g. ``from vlp.eval.retrieval import retrieval_metrics``.
"""

from vlp.eval.plots import plot_recall_curve
from vlp.eval.retrieval import chunked_topk, encode_split, evaluate_retrieval, retrieval_metrics
from vlp.eval.vqa import AnswerVocab, evaluate_vqa, vqa_accuracy, vqa_soft_score
from vlp.eval.zeroshot import evaluate_zeroshot, zeroshot_classifier

__all__ = [
    "retrieval_metrics", "chunked_topk", "encode_split", "evaluate_retrieval", "plot_recall_curve",
    "vqa_accuracy", "vqa_soft_score", "AnswerVocab", "evaluate_vqa",
    "zeroshot_classifier", "evaluate_zeroshot",
]
