"""Running a suite over checkpoints: each task's data is read once, each checkpoint loaded once, every
(task, checkpoint) timed, and a failing task reported in one line while the others run on."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlp.benchmark.compositional import (
    evaluate_selection,
    load_order,
    load_sugarcrepe,
    load_vg,
    load_winoground,
)
from vlp.benchmark.linear_probe import evaluate_probe_task, load_probe_task
from vlp.benchmark.report import checkpoint_labels, write_results
from vlp.benchmark.retrieval import evaluate_retrieval_task, load_retrieval_task
from vlp.benchmark.scoring import resolved_precision
from vlp.benchmark.suite import Suite, TaskSpec, spec_dict
from vlp.benchmark.zeroshot import evaluate_zeroshot_task, load_zeroshot_task
from vlp.errors import UserError

__all__ = ["BenchmarkRun", "run_suite", "LOADERS", "EVALUATORS"]

log = logging.getLogger(__name__)

Loader = Callable[[str, Any], Any]
Evaluator = Callable[[Any, Any, Any, Any, Any, bool], tuple[dict[str, float], dict[str, Any]]]
LOADERS: dict[str, Loader] = {
    "retrieval": load_retrieval_task, "zeroshot": load_zeroshot_task, "linear_probe": load_probe_task,
    "sugarcrepe": load_sugarcrepe, "winoground": load_winoground, "order": load_order,
    "vg_relation": lambda name, spec: load_vg(name, spec, attribution=False),
    "vg_attribution": lambda name, spec: load_vg(name, spec, attribution=True),
}
EVALUATORS: dict[str, Evaluator] = {
    "retrieval": evaluate_retrieval_task, "zeroshot": evaluate_zeroshot_task, "linear_probe": evaluate_probe_task,
    **{kind: evaluate_selection for kind in ("sugarcrepe", "winoground", "order", "vg_relation", "vg_attribution")},
}
# what a task's own number depends on beyond its settings (recorded with every number)
_TASK_PROTOCOL = {"sugarcrepe": "accuracy = ITC/ITM score of the caption > of the negative caption",
                  "winoground": "text, image and group scores (Thrush et al. 2022)",
                  "vg_relation": "macro accuracy over relations, image cropped to the relation's box",
                  "vg_attribution": "macro accuracy over attribute pairs, image cropped to the object's box",
                  "order": "accuracy = the true caption scores above every perturbed order"}


@dataclass
class BenchmarkRun:
    results: dict[str, Any]
    failed: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def _clean(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}


def _failure(task: str, spec: TaskSpec, err: Exception) -> str:
    message = " ".join(str(err).split()) or type(err).__name__
    paths = [str(v) for k, v in spec_dict(spec).items() if k in ("data", "image_root", "train", "test", "val") and v]
    if paths and not any(p in message for p in paths) and "tasks." not in message:
        message += f" (data: {paths[0]})"
    return f"task '{task}' failed: {message}"


def _model_protocol(model: Any, spec: TaskSpec, device: torch.device) -> dict[str, Any]:
    encoder = model.image_encoder
    return {"precision": resolved_precision(spec.precision, device), "image_size": int(encoder.image_size),
            "image_transform": "resize shorter side (bicubic) + center crop, normalized with the checkpoint's mean/std",
            "text_max_length": int(model.config.text.max_length), "tokenizer": str(model.config.text.tokenizer)}


def run_suite(suite: Suite, checkpoints: list[Path], output: Path, device: str = "auto", progress: bool = True,
              debug: bool = False, only: list[str] | None = None) -> BenchmarkRun:
    """Run every task of ``suite`` (or those in ``only``) on every checkpoint; rank 0 writes the results."""
    from vlp.models import VLPModel
    from vlp.train.distributed import init_distributed

    info = init_distributed(device)
    tasks = {name: spec for name, spec in suite.tasks.items() if not only or name in only}
    unknown = sorted(set(only or []) - set(suite.tasks))
    if unknown:
        raise UserError(f"--tasks: the suite has no task '{unknown[0]}' (it has {', '.join(suite.tasks)})")
    labels = checkpoint_labels([str(c) for c in checkpoints])
    results: dict[str, Any] = {"suite": suite.name, "suite_file": suite.source, "checkpoints": labels,
                               "checkpoint_paths": [str(c) for c in checkpoints], "device": str(info.device),
                               "world_size": info.world_size, "tasks": {}, "failed": []}
    run = BenchmarkRun(results)

    def fail(line: str) -> None:
        run.failed.append(line)
        if info.is_main:
            print(f"vlp: error: {line}", file=sys.stderr, flush=True)

    loaded: dict[str, Any] = {}
    for name, spec in tasks.items():
        results["tasks"][name] = {"type": spec.type, "settings": spec_dict(spec), "runs": {}}
        try:
            loaded[name] = LOADERS[spec.type](name, spec)
        except Exception as err:  # a missing or malformed dataset fails its own task only
            if debug:
                raise
            fail(_failure(name, spec, err))
    for label, checkpoint in zip(labels, checkpoints):
        model = VLPModel.from_pretrained(checkpoint).to(info.device).eval()
        transform = model.image_transform(train=False)
        for name, spec in tasks.items():
            if name not in loaded:
                continue
            start = time.perf_counter()
            try:
                metrics, protocol = EVALUATORS[spec.type](loaded[name], model, transform, spec, info.device, progress)
            except Exception as err:
                if debug:
                    raise
                fail(_failure(name, spec, err) + f" [{label}]")
                continue
            seconds = time.perf_counter() - start
            protocol = {"task": _TASK_PROTOCOL.get(spec.type), **protocol, **_model_protocol(model, spec, info.device)}
            results["tasks"][name]["runs"][label] = {"metrics": _clean(metrics), "protocol": protocol,
                                                     "seconds": round(seconds, 2)}
            if info.is_main:
                print(f"benchmark: {name} [{label}]: {seconds:.1f} s", file=sys.stderr, flush=True)
        del model
    results["failed"] = run.failed
    if info.is_main:
        run.files = write_results(results, output)
    return run
