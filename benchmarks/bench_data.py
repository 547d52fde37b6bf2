"""Data pipeline vs the demo training step: can the loader feed the step?

The pipeline is what ``vlp pretrain`` builds for the config (``vlp.train.loop.build_loader``): dataset
(decode or render), the training transform, the collator (tokenization included), the config's
``data.num_workers``. It is measured on two sources:

- ``synthetic``: the demo's own in-memory scenes (rendered, not decoded);
- ``files``: the same scenes written by ``vlp data synth`` (PNG files + JSON lines), so every image is
  read from disk and decoded.

The step is the demo's training step as the trainer runs it (objective forward + backward, gradient
clipping, AdamW step, zero_grad, momentum/queue hooks) on batches from the same loader. Target: each
pipeline delivers >= 2x the images/s the step consumes. Pipeline rounds and step rounds alternate.

    python benchmarks/bench_data.py [--size tiny|quick|full] [--config configs/pretrain/demo.yaml]
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from common import Report, base_parser, median, setup, sizes_for

SIZES = {
    "tiny": {"config": "configs/pretrain/demo_tiny.yaml", "rounds": 1, "batches": 2, "steps": 1, "files": 32},
    "quick": {"config": "configs/pretrain/demo.yaml", "rounds": 3, "batches": 6, "steps": 3, "files": 1000},
    "full": {"config": "configs/pretrain/demo.yaml", "rounds": 5, "batches": 20, "steps": 8, "files": 4000},
}
TARGET = 2.0
REPO = Path(__file__).resolve().parent.parent


def _loader(config: Any, model: Any) -> Iterator[dict[str, Any]]:
    from vlp.train.distributed import DistInfo
    from vlp.train.loop import build_loader

    loader, _, _ = build_loader(config, model, DistInfo(0, 0, 1, torch.device("cpu")))
    while True:
        yield from loader


def pipeline_rate(batches: Iterator[dict[str, Any]], count: int) -> float:
    """Images/s of ``count`` batches once the loader is running (its prefetched batches are drained first)."""
    for _ in range(2):
        next(batches)
    start = time.perf_counter()
    images = sum(int(next(batches)["images"].shape[0]) for _ in range(count))
    return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    from vlp.config import load_config
    from vlp.data.synthetic import write_synthetic
    from vlp.models.factory import build_model
    from vlp.objectives.pretrain import PretrainObjective
    from vlp.train.loop import autocast_factory
    from vlp.train.optim import build_optimizer, scaled_lr

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--config", default="", help="pretraining config (default: the size's demo config)")
    args = parser.parse_args(argv)
    cfg = sizes_for(args.size, SIZES)
    settings = setup(args)
    config = load_config(REPO / (args.config or cfg["config"]))
    report = Report("bench_data", args, {**settings, **cfg, "config": str(args.config or cfg["config"]),
                                         "num_workers": config.data.num_workers, "batch_size": config.data.batch_size,
                                         "image_size": config.model.image.image_size,
                                         "precision": config.train.precision})
    torch.manual_seed(config.train.seed)
    model = build_model(config.model)
    objective = PretrainObjective(model, config.objective, autocast=autocast_factory(config.train.precision,
                                                                                     torch.device("cpu")),
                                  chunk_size=config.train.contrastive_chunk_size)
    lr = scaled_lr(config.optim.lr, config.optim.base_batch_size, config.data.batch_size, config.optim.lr_scaling)
    optimizer = build_optimizer(model, config.optim, lr, "cpu")
    clip = config.optim.grad_clip if config.optim.grad_clip > 0 else math.inf

    with tempfile.TemporaryDirectory() as tmp:
        files = write_synthetic(tmp, train_size=cfg["files"], test_size=0, seed=config.data.synthetic_seed,
                                image_size=config.model.image.image_size)
        file_config = dataclasses.replace(config, data=dataclasses.replace(
            config.data, source="json", train=str(files["train"]), image_root=str(files["root"])))
        sources = {"synthetic": _loader(config, model), "files": _loader(file_config, model)}
        step_batches = [next(sources["synthetic"]) for _ in range(2)]

        def train_step(batch: dict[str, Any]) -> None:
            objective.training_step(batch)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            objective.after_optimizer_step()

        model.train()
        train_step(step_batches[0])  # warm-up: optimizer state, allocator
        rates: dict[str, list[float]] = {"step": [], "synthetic": [], "files": []}
        for _ in range(cfg["rounds"]):
            for name, batches in sources.items():
                rates[name].append(pipeline_rate(batches, cfg["batches"]))
            start = time.perf_counter()
            for i in range(cfg["steps"]):
                train_step(step_batches[i % len(step_batches)])
            rates["step"].append(cfg["steps"] * config.data.batch_size / (time.perf_counter() - start))

    report.detail("images_per_s_rounds", {k: [round(v, 1) for v in vals] for k, vals in rates.items()})
    step = median(rates["step"])
    report.figure("train_step_images_per_s", step, "images/s consumed by the demo step",
                  note=f"{config.train.precision}, batch {config.data.batch_size}")
    for name in ("synthetic", "files"):
        report.figure(f"{name}_pipeline_images_per_s", median(rates[name]), "images/s",
                      note=f"{config.data.num_workers} worker(s)")
        ratio = median([p / s for p, s in zip(rates[name], rates["step"])])
        report.figure(f"{name}_pipeline_over_step", ratio, "x step consumption", TARGET)
    report.detail("config_data", dataclasses.asdict(config.data))
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
