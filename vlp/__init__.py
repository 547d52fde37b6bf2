"""vlp: vision-language pretraining with pluggable encoders, fusion blocks and ITC/ITM/MLM objectives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "__version__"]


def load(directory: str | Path, image_size: int = 0) -> tuple[Any, Any, Any]:
    """One-call inference: ``model, tokenizer, image_transform = vlp.load(checkpoint_dir)``; ``image_size`` > 0
    loads the model at that resolution (position embeddings interpolated) with the matching transform."""
    from vlp.models import VLPModel

    model = VLPModel.from_pretrained(directory, image_size=image_size)
    return model, model.tokenizer, model.image_transform(train=False)
