"""The held-out retrieval split a run evaluates on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlp.config.schema import Config

__all__ = ["retrieval_split_for"]


def retrieval_split_for(config: Config, image_size: int) -> Any:
    """The config's test split: a JSON/JSONL file, or the synthetic test split; None when there is none."""
    d = config.data
    if d.test:
        from vlp.data.datasets import csv_format_from
        from vlp.data.retrieval_split import load_retrieval_split

        return load_retrieval_split(Path(d.test), Path(d.test_image_root or d.image_root), csv_format_from(d))
    if d.source == "synthetic":
        from vlp.data.retrieval_split import synthetic_retrieval_split
        from vlp.data.synthetic import SyntheticScenes

        scenes = SyntheticScenes(d.synthetic_test_size, seed=d.synthetic_seed, split="test",
                                 image_size=image_size)
        return synthetic_retrieval_split(scenes)
    return None
