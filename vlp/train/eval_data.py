"""Evaluation during a run: the held-out retrieval split, its k_test, and zero-shot classification.

``run_evaluator`` gives the ``evaluate(step, final)`` the pretraining loop calls when one is due: it evaluates what is
due (retrieval every ``eval.every`` steps, zero-shot every ``eval.zeroshot_every``) and returns flat
``eval/...`` metrics for metrics.jsonl, or nothing.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlp.config.schema import Config
from vlp.config.validate import k_test_for_gallery
from vlp.errors import UserError

if TYPE_CHECKING:
    from vlp.models import VLPModel
    from vlp.train.distributed import DistInfo

__all__ = ["retrieval_split_for", "check_test_gallery", "due", "evaluation_due", "run_evaluator"]


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


def due(every: int, step: int, final: bool) -> bool:
    """An evaluation every ``every`` steps runs now: at the end unless ``every`` < 0, else at multiples of it."""
    return every >= 0 if final else every > 0 and step % every == 0


def evaluation_due(config: Config, step: int, final: bool = False) -> bool:
    """Any of the run's evaluations (retrieval or VQA every eval.every, zero-shot every eval.zeroshot_every)
    is due at ``step``."""
    e = config.eval
    return due(e.every, step, final) or bool(e.zeroshot) and due(e.zeroshot_every, step, final)


def check_test_gallery(config: Config, model: VLPModel) -> int:
    """The k_test the run's retrieval evaluations use, known before training starts (a test split larger
    than the gallery is clamped once, with its note, here rather than at every evaluation)."""
    e = config.eval
    split = retrieval_split_for(config, model.image_encoder.image_size) if e.every >= 0 and model.has_fusion else None
    if split is None:
        return e.k_test
    images, texts = split.num_images, len(split.captions)
    if 0 < e.max_images < images:  # the captions of the first max_images images
        texts = sum(1 for image in split.txt2img if image < e.max_images)
        images = e.max_images
    return k_test_for_gallery(e.k_test, images, texts)


def _zeroshot_split(config: Config) -> Any:
    e, d = config.eval, config.data
    if not e.zeroshot:
        return None
    from vlp.data.vqa_data import load_zeroshot

    for key, value in (("eval.zeroshot", e.zeroshot), ("eval.zeroshot_classes", e.zeroshot_classes)):
        if not Path(value).exists():
            raise UserError(f"{key}: not found: {value}")
    root = e.zeroshot_image_root or d.test_image_root or d.image_root
    return load_zeroshot(e.zeroshot, root, e.zeroshot_classes)


def run_evaluator(config: Config, model: VLPModel, run_dir: Path,
                  dist: DistInfo) -> Callable[[int, bool], dict[str, float]]:
    """The run's ``evaluate(step, final)``; its data are loaded here, so that a missing file stops the run
    before training."""
    k_test = check_test_gallery(config, model)
    zeroshot = _zeroshot_split(config)
    from vlp.eval.zeroshot import default_templates

    templates = default_templates(model, list(zeroshot.classes)) if zeroshot is not None else []

    def evaluate(step: int, final: bool) -> dict[str, float]:
        flat: dict[str, float] = {}
        if due(config.eval.every, step, final):
            flat.update(_retrieval(config, model, run_dir, dist, final, k_test))
        if zeroshot is not None and due(config.eval.zeroshot_every, step, final):
            flat.update(_zeroshot(config, model, zeroshot, templates, run_dir, dist, final))
        return flat

    return evaluate


def _retrieval(config: Config, model: VLPModel, run_dir: Path, dist: DistInfo, final: bool,
               k_test: int) -> dict[str, float]:
    """Retrieval on the run's held-out split; flat ``eval/{itc,itm}/...`` metrics."""
    from vlp.eval.plots import plot_recall_curve
    from vlp.eval.retrieval import evaluate_retrieval

    split = retrieval_split_for(config, model.image_encoder.image_size)
    if split is None:
        return {}
    e = config.eval
    model.eval()
    # every rank encodes and ranks its shard; all get the same result
    result = evaluate_retrieval(model, split, model.image_transform(train=False), dataclasses.replace(e,
                                k_test=k_test),
                                device=str(dist.device), progress=config.train.progress)
    model.train()
    if final and dist.rank == 0:
        (run_dir / "eval_retrieval.json").write_text(json.dumps(result, indent=2))
        plot_recall_curve(result, run_dir / "plots" / "recall_at_k.png")
    return {f"eval/{kind}/{name}": float(value) for kind, values in (("itc", result["itc"]), ("itm", result.get("itm")))
            if values is not None for name, value in values.items()}


def _zeroshot(config: Config, model: VLPModel, split: Any, templates: list[str], run_dir: Path, dist: DistInfo,
              final: bool) -> dict[str, float]:
    """ITC zero-shot top-1/top-5 on eval.zeroshot (rank 0 only: only it writes metrics)."""
    if dist.rank != 0:
        return {}
    from vlp.eval.zeroshot import evaluate_zeroshot

    e = config.eval
    result = evaluate_zeroshot(model, split, model.image_transform(train=False), list(split.classes), templates,
                               batch_size=e.batch_size, precision=e.precision, device=str(dist.device),
                               progress=config.train.progress)
    model.train()
    if final:
        (run_dir / "eval_zeroshot.json").write_text(json.dumps(result, indent=2))
    return {f"eval/zeroshot/{name}": float(result[name]) for name in ("itc_top1", "itc_top5")}
