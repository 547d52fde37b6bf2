"""Training: the pretraining loop and its parts (optimizer, schedule, checkpoints, distributed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["pretrain"]


def pretrain(config: Any, output_dir: str | Path | None = None, resume: bool = False,
             overwrite: bool = False) -> Path:
    """Pretrain from a Config, a YAML path or a dict; returns the run directory. A directory that holds a
    run is continued with ``resume``, replaced with ``overwrite``, else refused."""
    from vlp.config import load_config
    from vlp.train.loop import pretrain as run

    if not hasattr(config, "train"):
        config = load_config(config)
    return run(config, output_dir=output_dir, resume=resume, overwrite=overwrite)
