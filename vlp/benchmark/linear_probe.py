"""Linear probe on frozen image features, CLIP_benchmark's protocol.

Features: the model's L2-normalized image embeddings. Probe: one ``torch.nn.Linear`` trained with AdamW and
cross-entropy, a cosine learning-rate schedule without warmup, ``epochs`` passes of shuffled batches, seeded.
Weight decay: searched on a validation split (``val``, else ``val_proportion`` of the training images drawn
with the seed) over 97 values log-spaced in [1e-6, 1e2]: first the 7 values 1e-6, 1e-4.67, ..., 1e2, then
around the best one at index steps 8, 4, 2, 1 (the best of left, centre, right each time; ties keep the
earlier); the final probe trains on train + validation with the chosen value and is scored on the test split.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Subset

from vlp.benchmark.files import ImageRefs, image_folder
from vlp.benchmark.scoring import resolved_precision
from vlp.benchmark.suite import LinearProbeTask, required_path
from vlp.benchmark.zeroshot import classification_metrics
from vlp.collectives import gather_shards, rank_and_world, shard_rows
from vlp.errors import UserError
from vlp.eval.retrieval import autocast_context, encode_images, resolve_device

__all__ = ["ProbeData", "load_probe_task", "train_probe", "search_weight_decay", "evaluate_probe_task",
           "WEIGHT_DECAYS"]

WEIGHT_DECAYS: list[float] = np.logspace(-6, 2, num=97).tolist()
_FIRST_GRID = list(range(0, 97, 16))  # the 7 values log-spaced in [1e-6, 1e2]


@dataclass
class ProbeData:
    classes: list[str]
    splits: dict[str, tuple[list[Path], list[int]]]  # train / val (may be empty) / test
    val_source: str


def load_probe_task(name: str, spec: LinearProbeTask) -> ProbeData:
    classes, train_paths, train_labels = image_folder(required_path(name, spec, "train", "directory"))
    test_classes, test_paths, test_labels = image_folder(required_path(name, spec, "test", "directory"))
    if test_classes != classes:
        raise UserError(f"tasks.{name}: the test folder's classes differ from the training folder's")
    val: tuple[list[Path], list[int]] = ([], [])
    if spec.val:
        val_classes, val_paths, val_labels = image_folder(required_path(name, spec, "val", "directory"))
        if val_classes != classes:
            raise UserError(f"tasks.{name}: the validation folder's classes differ from the training folder's")
        val, source = (val_paths, val_labels), spec.val
    elif 0 < spec.val_proportion < 1:
        order = torch.randperm(len(train_paths), generator=torch.Generator().manual_seed(spec.seed)).tolist()
        cut = max(1, round(len(order) * spec.val_proportion))
        held, kept = sorted(order[:cut]), sorted(order[cut:])
        val = ([train_paths[i] for i in held], [train_labels[i] for i in held])
        train_paths, train_labels = [train_paths[i] for i in kept], [train_labels[i] for i in kept]
        source = f"{spec.val_proportion:g} of the training images (seed {spec.seed})"
    else:
        source = "none: weight decay 0 (no search)"
    return ProbeData(classes, {"train": (train_paths, train_labels), "val": val, "test": (test_paths, test_labels)},
                     source)


@torch.enable_grad()  # also when called under no_grad (the evaluation is)
def train_probe(features: Tensor, labels: Tensor, num_classes: int, weight_decay: float, lr: float, epochs: int,
                batch_size: int, seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    probe = torch.nn.Linear(features.shape[1], num_classes).to(features.device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(features) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator).to(features.device)
        for start in range(0, len(features), batch_size):
            for group in optimizer.param_groups:  # cosine from lr to 0, no warmup
                group["lr"] = 0.5 * (1 + math.cos(math.pi * step / total)) * lr
            rows = order[start:start + batch_size]
            loss = F.cross_entropy(probe(features[rows]), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    return probe.eval()


def search_weight_decay(accuracy_of: Callable[[float], float]) -> tuple[float, list[tuple[float, float]]]:
    """(best weight decay, every (weight decay, validation accuracy) tried, in order)."""
    tried: dict[int, float] = {}

    def best_of(indices: list[int]) -> int:
        best, best_accuracy = indices[0], -1.0
        for index in indices:
            if index not in tried:
                tried[index] = accuracy_of(WEIGHT_DECAYS[index])
            if tried[index] > best_accuracy:
                best, best_accuracy = index, tried[index]
        return best

    peak = best_of(_FIRST_GRID)
    span = 8
    while span > 0:
        peak = best_of([max(peak - span, 0), peak, min(peak + span, len(WEIGHT_DECAYS) - 1)])
        span //= 2
    return WEIGHT_DECAYS[peak], [(WEIGHT_DECAYS[i], a) for i, a in tried.items()]


def _features(model: Any, paths: list[Path], transform: Any, spec: LinearProbeTask, device: torch.device,
              progress: bool) -> Tensor:
    """Image embeddings [n, e]; under torchrun each rank encodes its block and the blocks are gathered."""
    if not paths:
        return torch.empty(0)
    rank, world = rank_and_world()
    rows = shard_rows(len(paths), rank, world)
    autocast = autocast_context(resolved_precision(spec.precision, device), device)
    if not len(rows):  # fewer images than ranks: this rank's block is empty but still joins the gather
        width = int(model.config.embed_dim) or int(model.image_encoder.embed_dim)  # 0: the encoder's own
        return gather_shards(torch.zeros(0, width, device=device), len(paths))
    local, _ = encode_images(model, Subset(ImageRefs(paths, transform), rows), spec.batch_size, spec.num_workers,
                             device, autocast, False, progress and rank == 0)
    return gather_shards(local, len(paths))


@torch.no_grad()
def evaluate_probe_task(data: ProbeData, model: Any, transform: Any, spec: LinearProbeTask,
                        device: str | torch.device | None, progress: bool) -> tuple[dict[str, float], dict[str, Any]]:
    target = resolve_device(model, device)
    was_training = model.training
    model.eval()
    try:
        feats = {name: _features(model, paths, transform, spec, target, progress)
                 for name, (paths, _) in data.splits.items()}
    finally:
        model.train(was_training)
    labels = {name: torch.as_tensor(split[1], dtype=torch.long, device=target) for name, split in data.splits.items()}
    num_classes = len(data.classes)

    def fit(features: Tensor, targets: Tensor, decay: float) -> torch.nn.Linear:
        return train_probe(features, targets, num_classes, decay, spec.lr, spec.epochs, spec.probe_batch_size,
                           spec.seed)

    def val_accuracy(decay: float) -> float:
        probe = fit(feats["train"], labels["train"], decay)
        return (probe(feats["val"]).argmax(dim=1) == labels["val"]).double().mean().item()

    tried: list[tuple[float, float]] = []
    decay = 0.0
    train_x, train_y = feats["train"], labels["train"]
    if len(labels["val"]):
        decay, tried = search_weight_decay(val_accuracy)
        train_x, train_y = torch.cat([train_x, feats["val"]]), torch.cat([train_y, labels["val"]])
    probe = fit(train_x, train_y, decay)
    logits = probe(feats["test"])
    truth = labels["test"]
    ranks = (logits > logits.gather(1, truth[:, None])).sum(dim=1)  # the true class's rank (argmax = 0)
    metrics = {f"probe/{k}": v for k, v in classification_metrics(ranks.cpu(), truth.cpu(), num_classes).items()}
    protocol = {"features": "L2-normalized image embeddings (frozen)", "weight_decay": decay,
                "weight_decays_tried": len(tried), "validation": data.val_source, "lr": spec.lr,
                "epochs": spec.epochs, "probe_batch_size": spec.probe_batch_size, "seed": spec.seed,
                "optimizer": "AdamW, cosine schedule without warmup, cross-entropy",
                "num_train": len(train_y), "num_test": len(truth)}
    return metrics, protocol
