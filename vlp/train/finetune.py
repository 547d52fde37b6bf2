"""Fine-tuning: VQA (classifier on the fused pooled output, soft-score BCE) and retrieval (ITC + ITM)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from vlp.config.io import to_dict
from vlp.config.schema import Config
from vlp.errors import UserError
from vlp.models import VLPModel, VQAModel
from vlp.objectives.vqa import VQAObjective
from vlp.precision import DEFAULT_PRECISION
from vlp.train.distributed import DistInfo, init_distributed
from vlp.train.eval_data import due
from vlp.train.loop import (
    autocast_factory,
    load_model_weights,
    prepare_model,
    pretrain,
    run_dir_for,
    run_training,
)
from vlp.train.run_dir import prepare_run_dir
from vlp.train.sampler import ResumableSampler, SeededDataset
from vlp.train.seeding import seed_everything
from vlp.train.state import TrainingJob

if TYPE_CHECKING:
    from vlp.eval.vqa_baselines import AnswerPriors

__all__ = ["finetune_vqa", "finetune_retrieval", "load_vqa_checkpoint", "vqa_questions"]


def _load_init(init: str | Path, image_size: int = 0) -> VLPModel:
    """The --init checkpoint, at ``image_size`` (train.init_image_size) when that is set."""
    root = Path(init)
    if not (root / "config.yaml").is_file():
        raise UserError(f"--init: not a vlp checkpoint directory: {init}")
    model = VLPModel.from_pretrained(root, image_size=image_size)
    model.train()
    return model


def finetune_retrieval(config: Config, init: str | Path, output_dir: str | Path | None = None,
                       resume: bool = False, overwrite: bool = False) -> Path:
    """ALBEF/BLIP retrieval fine-tuning: ITC (captions of one image are all positives) + ITM with hard
    negatives that never share the image, from a pretrained checkpoint."""
    return pretrain(config, output_dir=output_dir, resume=resume,
                    model=_load_init(init, config.train.init_image_size), overwrite=overwrite)


# VQA --------------------------------------------------------------------------------------------
def vqa_questions(config: Config, split: str, image_size: int) -> tuple[list[dict[str, Any]], Any]:
    """(questions, image loader) for the train or val split: the VQA files, or the synthetic questions."""
    from vlp.data.retrieval_split import load_image_file
    from vlp.data.vqa_data import load_vqa, synthetic_vqa

    path = config.vqa.train if split == "train" else config.vqa.val
    if path:
        return load_vqa(path, config.vqa.image_root), load_image_file
    if config.data.source != "synthetic":
        raise UserError(f"vqa.{split} is empty and data.source is not synthetic: name a VQA file")
    from vlp.data.synthetic import SyntheticScenes

    d = config.data
    size = d.synthetic_train_size if split == "train" else d.synthetic_test_size
    scenes = SyntheticScenes(size, seed=d.synthetic_seed, split="train" if split == "train" else "test",
                             image_size=image_size)
    return synthetic_vqa(scenes), scenes.render


class VQACollator:
    def __init__(self, tokenizer: Any, max_length: int, vocab: Any) -> None:
        self.tokenizer, self.max_length, self.vocab = tokenizer, max_length, vocab

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Tensor]:
        tokens = self.tokenizer([s["question"] for s in samples], max_length=self.max_length)
        return {"images": torch.stack([s["image"] for s in samples]), "input_ids": tokens["input_ids"],
                "attention_mask": tokens["attention_mask"],
                "targets": torch.stack([self.vocab.targets(s["answers"]) for s in samples])}


def save_vqa(vqa_model: Any, vocab: Any, config: Config, directory: Path) -> None:
    vqa_model.model.save_pretrained(directory, {"run": to_dict(config),
                                                "vqa": {"num_answers": len(vocab), "hidden_mult": config.vqa.hidden_mult,
                                                        "head_input": config.vqa.head_input}})
    safetensors.torch.save_model(vqa_model.head, str(directory / "vqa_head.safetensors"))
    vocab.save(directory / "answers.json")


def require_vqa_files(root: Path) -> tuple[Path, Path]:
    """The VQA head and answer files of a checkpoint directory, or one error line saying it has none."""
    head_path, answers_path = root / "vqa_head.safetensors", root / "answers.json"
    if not head_path.is_file() or not answers_path.is_file():
        raise UserError(f"{root}: not a VQA checkpoint (no vqa_head.safetensors/answers.json); "
                        f"run 'vlp finetune vqa CONFIG --init {root}' first")
    return head_path, answers_path


def load_vqa_checkpoint(directory: str | Path) -> tuple[Any, Any]:
    """(VQAModel, AnswerVocab) from a VQA fine-tuned checkpoint."""
    import yaml

    from vlp.eval.vqa import AnswerVocab

    root = Path(directory)
    model = VLPModel.from_pretrained(root)
    if not model.has_fusion:
        raise UserError(f"{root}: the model has no fusion block (fusion.type: none): VQA needs a fused model")
    head_path, answers_path = require_vqa_files(root)
    meta = (yaml.safe_load((root / "config.yaml").read_text()) or {}).get("vqa", {})
    vocab = AnswerVocab.load(answers_path)
    # checkpoints written before vqa.head_input existed read the fused output only
    vqa_model = VQAModel(model, len(vocab), hidden_mult=int(meta.get("hidden_mult", 2)),
                         head_input=str(meta.get("head_input", "fused")))
    load_model_weights(vqa_model.head, head_path, torch.device("cpu"))
    return vqa_model.eval(), vocab


def evaluate_vqa_split(vqa_model: Any, vocab: Any, questions: list[dict[str, Any]], loader: Any,
                       batch_size: int, device: str, progress: bool, precision: str = DEFAULT_PRECISION,
                       priors: AnswerPriors | None = None) -> tuple[list[Any], dict[str, Any]]:
    """Predictions and metrics; with ``priors`` (``AnswerPriors`` of the training questions) the metrics also
    hold the image-blind ``baselines`` and ``baselines_info`` (vlp.eval.vqa_baselines)."""
    # in a process group every rank answers its share of the questions (one process: evaluate_vqa)
    from vlp.eval.distributed import evaluate_vqa_sharded as evaluate_vqa
    from vlp.eval.vqa_baselines import vqa_baselines

    transform = vqa_model.model.image_transform(train=False)
    predictions, metrics = evaluate_vqa(vqa_model, questions, lambda image: transform(loader(image)), vocab,
                                        batch_size=batch_size, device=device, progress=progress, precision=precision)
    if priors is not None:
        metrics.update(vqa_baselines(priors, questions))
    return predictions, metrics


def finetune_vqa(config: Config, init: str | Path, output_dir: str | Path | None = None,
                 resume: bool = False, overwrite: bool = False) -> Path:
    """VQA fine-tuning of a fused checkpoint; evaluates the val split and writes predictions + accuracy."""
    from vlp.eval.vqa import AnswerVocab
    from vlp.eval.vqa_baselines import AnswerPriors

    dist = init_distributed(config.train.device)
    run_dir = run_dir_for(config, output_dir)
    prepare_run_dir(run_dir, resume, overwrite, dist)
    seed_everything(config.train.seed)
    model = _load_init(init, config.train.init_image_size)
    if not model.has_fusion:
        raise UserError(f"{init}: the model has no fusion block (fusion.type: none): VQA needs a fused model")
    model = prepare_model(config, model)
    image_size = model.image_encoder.image_size
    questions, loader = vqa_questions(config, "train", image_size)
    vocab = AnswerVocab.build(questions, top_n=config.vqa.num_answers)
    priors = AnswerPriors.fit(questions)
    vqa_model = VQAModel(model, len(vocab), hidden_mult=config.vqa.hidden_mult,
                         head_input=config.vqa.head_input).to(dist.device)
    objective = VQAObjective(vqa_model, autocast_factory(config.train.precision, dist.device)).to(dist.device)
    data_loader, dataset, sampler = _vqa_loader(config, model, vocab, questions, loader, dist)
    val_questions, val_loader = vqa_questions(config, "val", image_size)

    def save_weights(directory: Path) -> None:
        save_vqa(vqa_model, vocab, config, directory)

    def load_weights(directory: Path) -> None:
        load_model_weights(model, directory / "model.safetensors", dist.device)
        load_model_weights(vqa_model.head, directory / "vqa_head.safetensors", dist.device)

    def evaluate(step: int, final: bool) -> dict[str, float]:
        if not due(config.eval.every, step, final):  # a zero-shot cadence does not apply to VQA
            return {}
        predictions, metrics = evaluate_vqa_split(vqa_model, vocab, val_questions, val_loader,
                                                  config.eval.batch_size, str(dist.device), config.train.progress,
                                                  precision=config.eval.precision,
                                                  priors=priors if final else None)
        vqa_model.train()
        if final and dist.rank == 0:
            (run_dir / "vqa_predictions.json").write_text(json.dumps(predictions))
            (run_dir / "eval_vqa.json").write_text(json.dumps(metrics, indent=2))
        flat = {"eval/vqa/overall": float(metrics["overall"] or 0.0)}
        flat.update({f"eval/vqa/{kind}": float(v) for kind, v in metrics["per_type"].items()})
        return flat

    job = TrainingJob(vqa_model, objective, data_loader, dataset, sampler, save_weights, load_weights, evaluate)
    return run_training(config, job, run_dir, dist, resume)


def _vqa_loader(config: Config, model: VLPModel, vocab: Any, questions: list[dict[str, Any]], loader: Any,
                dist: DistInfo) -> tuple[DataLoader[Any], Any, ResumableSampler]:
    from vlp.data.transforms import train_transform
    from vlp.data.vqa_data import VQADataset

    d, enc = config.data, model.image_encoder
    transform = train_transform(enc.image_size, enc.mean, enc.std, crop_scale=tuple(d.crop_scale), hflip=d.hflip)
    dataset = SeededDataset(VQADataset(questions, loader, transform), config.train.seed)
    if len(dataset) < d.batch_size * dist.world_size:
        raise UserError(f"data.batch_size {d.batch_size} exceeds the {len(dataset)} VQA training questions")
    sampler = ResumableSampler(len(dataset), config.train.seed, dist.rank, dist.world_size, d.batch_size)
    collate = VQACollator(model.tokenizer, model.config.text.max_length, vocab)
    data_loader = DataLoader(dataset, sampler=sampler, batch_size=d.batch_size, collate_fn=collate,
                             num_workers=d.num_workers, pin_memory=dist.device.type == "cuda", drop_last=True,
                                  # its own generator: creating an iterator must not draw from the global RNG
                                  generator=torch.Generator().manual_seed(config.train.seed))
    return data_loader, dataset, sampler
