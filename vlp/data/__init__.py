"""Data: the embedded synthetic dataset, pair datasets (registered in ``vlp.registry.datasets``),
transforms, collation, retrieval/VQA/zero-shot splits.

``vlp.data.tokenizers`` is not imported here: it reads ``SYNTHETIC_WORDS`` lazily and is imported directly.
"""

from vlp.data.collate import Collator, seed_worker
from vlp.data.datasets import HFPairs, JsonPairs, SyntheticPairs, WebDatasetPairs, build_pretrain_dataset
from vlp.data.retrieval_split import (
    ImageDataset,
    RetrievalSplit,
    load_retrieval_split,
    synthetic_retrieval_split,
)
from vlp.data.streaming import HFStreamPairs, WebDatasetStream  # registers the streaming sources
from vlp.data.synthetic import SYNTHETIC_WORDS, ZEROSHOT_TEMPLATES, SyntheticScenes, write_synthetic
from vlp.data.transforms import eval_transform, open_image, train_transform
from vlp.data.vqa_data import (
    VQADataset,
    ZeroShotSplit,
    load_vqa,
    load_zeroshot,
    synthetic_vqa,
    synthetic_zeroshot,
)

__all__ = [
    "SYNTHETIC_WORDS", "ZEROSHOT_TEMPLATES", "SyntheticScenes", "write_synthetic",
    "SyntheticPairs", "JsonPairs", "HFPairs", "WebDatasetPairs", "WebDatasetStream", "HFStreamPairs",
    "build_pretrain_dataset",
    "train_transform", "eval_transform", "open_image",
    "Collator", "seed_worker",
    "RetrievalSplit", "load_retrieval_split", "synthetic_retrieval_split",
    "ImageDataset",
    "VQADataset", "ZeroShotSplit", "load_vqa", "synthetic_vqa",
    "load_zeroshot", "synthetic_zeroshot",
]
