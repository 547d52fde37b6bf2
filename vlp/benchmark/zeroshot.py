"""Zero-shot classification benchmarks: ImageFolder directories and CLIP_benchmark webdataset exports.

Class names and templates come, in this order, from the dataset's own files (``classnames.txt`` and
``zeroshot_classification_templates.txt`` beside the class folders or the shard directories, as CLIP_benchmark
exports them), the task's ``classnames`` / ``templates`` files, or, named ``imagenet1k``, open_clip's ImageNet-1k
class names and templates (imported from ``open_clip.zero_shot_metadata``). Templates may use CLIP_benchmark's
``{c}`` or Python's ``{}`` for the class name.

Images are classified batch by batch (a fused model's image tokens never all sit in memory); under torchrun
rank r takes the images whose index i has i % world == r, and the per-image ranks are gathered. Metrics are
CLIP_benchmark's: top-1, top-5 (five or more classes) and mean per-class recall (balanced accuracy), for the
ITC classifier and, for a fused model, after ITM re-scores each image's top ``itm_k`` classes (one column per
rule in ``scores``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, get_worker_info
from tqdm.auto import tqdm

from vlp.benchmark.files import BytesImages, ImageRefs, image_folder, read_name_list, read_wds, wds_urls
from vlp.benchmark.scoring import resolved_precision
from vlp.benchmark.suite import ZeroShotTask, required_path
from vlp.collectives import rank_and_world
from vlp.errors import UserError
from vlp.eval.rerank import check_score
from vlp.eval.retrieval import autocast_context, resolve_device
from vlp.eval.zeroshot import DEFAULT_TEMPLATES, class_prompts, classify_batch

__all__ = ["ZeroShotData", "load_zeroshot_task", "evaluate_zeroshot_task", "classification_metrics"]

OWN_CLASSNAMES, OWN_TEMPLATES = "classnames.txt", "zeroshot_classification_templates.txt"


@dataclass
class ZeroShotData:
    classnames: list[str]
    templates: list[str]
    prompts: dict[str, Any]  # where the class names and templates came from
    paths: list[Path] = field(default_factory=list)  # imagefolder
    labels: list[int] = field(default_factory=list)  # imagefolder
    urls: list[str] = field(default_factory=list)  # wds

    def dataset(self, transform: Any, rank: int, world: int) -> Dataset[Any]:
        if self.urls:
            return _WdsStream(self.urls, transform, rank, world)
        images = ImageRefs(self.paths, transform)
        return Subset(_Labelled(images, self.labels), range(rank, len(self.paths), world))


class _Labelled(Dataset[dict[str, Any]]):
    def __init__(self, images: Dataset[Any], labels: Sequence[int]) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": self.labels[index], "index": index}


class _WdsStream(IterableDataset[dict[str, Any]]):
    """Every shard read in order; this rank (and DataLoader worker) decodes only its own samples."""

    def __init__(self, urls: list[str], transform: Any, rank: int, world: int) -> None:
        self.urls, self.transform, self.rank, self.world = urls, transform, rank, world

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        stride, mine = self.world * workers, self.rank * workers + worker
        for index, sample in enumerate(read_wds(self.urls, ["cls"], lambda i: i % stride == mine)):
            if sample.image is None:
                continue
            text = sample.fields["cls"].decode("utf-8").strip()
            if not text.lstrip("-").isdigit():
                raise UserError(f"{sample.url}: sample '{sample.key}': 'cls' must be an integer, got '{text[:20]}'")
            image = BytesImages([sample.image], [sample.key], self.transform)[0]
            yield {"image": image, "label": int(text), "index": index}


def _open_clip_names(value: str, kind: str) -> list[str] | None:
    if value not in ("imagenet1k", "imagenet1k_simple"):
        return None
    from open_clip import zero_shot_metadata as metadata

    if kind == "classnames":
        return list(metadata.IMAGENET_CLASSNAMES)
    templates = metadata.SIMPLE_IMAGENET_TEMPLATES if value.endswith("simple") else metadata.OPENAI_IMAGENET_TEMPLATES
    return [template("{}") for template in templates]  # open_clip's templates are functions of the class name


def _names(name: str, spec: ZeroShotTask, root: Path, kind: str, own_file: str) -> tuple[list[str] | None, str]:
    own = root / own_file
    if own.is_file():
        return read_name_list(own), str(own)
    value = str(getattr(spec, kind))
    if not value:
        return None, ""
    named = _open_clip_names(value, kind)
    if named is not None:
        return named, f"open_clip.zero_shot_metadata ({value})"
    return read_name_list(required_path(name, spec, kind, "file")), value


def load_zeroshot_task(name: str, spec: ZeroShotTask) -> ZeroShotData:
    for score in spec.scores:
        check_score(score, f"tasks.{name}.scores")
    root = required_path(name, spec, "data", "directory")
    paths: list[Path] = []
    labels: list[int] = []
    urls: list[str] = []
    folders: list[str] = []
    if spec.format == "wds":
        urls = wds_urls(root, spec.split)
    else:
        folders, paths, labels = image_folder(root)
    classnames, class_source = _names(name, spec, root, "classnames", OWN_CLASSNAMES)
    if classnames is None:
        if not folders:
            raise UserError(f"{root}: no {OWN_CLASSNAMES}; set tasks.{name}.classnames (a file, or imagenet1k)")
        classnames, class_source = folders, "the class folder names"
    if folders and len(folders) != len(classnames):
        raise UserError(f"{root}: {len(folders)} class folders but {len(classnames)} class names ({class_source})")
    templates, template_source = _names(name, spec, root, "templates", OWN_TEMPLATES)
    if templates is None:
        templates, template_source = list(DEFAULT_TEMPLATES), "vlp's default"
    templates = [t.replace("{c}", "{}") for t in templates]  # CLIP_benchmark writes {c}
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise UserError(f"{template_source}: template '{bad[0]}' has no {{c}} or {{}} for the class name")
    prompts = {"classnames": class_source, "num_classes": len(classnames), "templates": template_source,
               "num_templates": len(templates), "first_template": templates[0]}
    return ZeroShotData(classnames, templates, prompts, paths, labels, urls)


def classification_metrics(ranks: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    """top1, top5 (with five or more classes) and mean per-class recall (percent) from the rank of each
    image's true class (0 = predicted)."""
    metrics = {"top1": 100.0 * (ranks < 1).double().mean().item()}
    if num_classes >= 5:
        metrics["top5"] = 100.0 * (ranks < 5).double().mean().item()
    recalls = [(ranks[labels == c] == 0).double().mean().item() for c in labels.unique().tolist()]
    metrics["mean_per_class_recall"] = 100.0 * sum(recalls) / len(recalls)
    return metrics


def _gather(rows: list[Tensor]) -> Tensor:
    local = torch.cat(rows) if rows else torch.empty(0, 4, dtype=torch.long)
    _, world = rank_and_world()
    if world == 1:
        return local
    from vlp.collectives import gather_objects

    return torch.cat(gather_objects(local))


@torch.no_grad()
def evaluate_zeroshot_task(data: ZeroShotData, model: Any, transform: Any, spec: ZeroShotTask,
                           device: str | torch.device | None, progress: bool) -> tuple[dict[str, float], dict[str, Any]]:
    target = resolve_device(model, device)
    precision = resolved_precision(spec.precision, target)
    autocast = autocast_context(precision, target)
    num_classes = len(data.classnames)
    rank, world = rank_and_world()
    was_training = model.training
    model.eval()
    try:
        classes = class_prompts(model, data.classnames, data.templates, spec.itm_k, target, spec.batch_size,
                                precision)
        scores_used = tuple(spec.scores) if classes.rerank_k else ()
        loader = DataLoader(data.dataset(transform, rank, world), batch_size=spec.batch_size,
                            num_workers=spec.num_workers)
        rows = []  # [b, 3 + scores]: index, label, ITC rank, the rank under each re-scoring rule
        for batch in tqdm(loader, desc="zero-shot", disable=not (progress and rank == 0)):
            labels = batch["label"].long()
            if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
                raise UserError(f"a label is outside the {num_classes} classes ({data.prompts['classnames']})")
            ranks, _ = classify_batch(model, batch["image"], labels, classes, scores_used, spec.batch_size,
                                      autocast)
            rows.append(torch.cat([batch["index"].long()[:, None], labels[:, None], ranks], dim=1))
    finally:
        model.train(was_training)
    table = _gather(rows)
    if not len(table):
        raise UserError("the zero-shot dataset has no images")
    table = table[table[:, 0].argsort()]
    metrics = {f"itc/{k}": v for k, v in classification_metrics(table[:, 2], table[:, 1], num_classes).items()}
    for column, score in enumerate(scores_used, start=3):
        metrics.update({f"{score}/{k}": v
                        for k, v in classification_metrics(table[:, column], table[:, 1], num_classes).items()})
    protocol = {"num_images": len(table), "prompts": data.prompts, "scores": ["itc", *scores_used],
                "itm_k": classes.rerank_k or None, "classifier": "mean of the L2-normalized prompt embeddings, renormalized"}
    return metrics, protocol
