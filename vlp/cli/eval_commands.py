"""``vlp finetune`` and ``vlp eval`` subcommands."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from vlp.cli.arguments import add_overwrite, checkpoint_dir, existing_path
from vlp.config.schema import RERANK_SCORES
from vlp.errors import UserError
from vlp.precision import DEFAULT_PRECISION, PRECISIONS

__all__ = ["add_eval_commands", "add_finetune_commands"]


def _image_root(value: str) -> Path:
    return existing_path(value, "directory", "--image-root")


def _write(result: Mapping[str, Any], output: str | None) -> None:
    text = json.dumps(result, indent=2)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)
    print(text)


def _device(value: str) -> str:
    import torch

    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return value


def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from vlp.config.schema import EvalConfig
    from vlp.config.validate import k_test_for_gallery
    from vlp.data.csv_records import CsvFormat
    from vlp.data.retrieval_split import load_retrieval_split
    from vlp.eval.plots import plot_recall_curve
    from vlp.eval.retrieval import evaluate_retrieval
    from vlp.models import VLPModel

    checkpoint = checkpoint_dir(args.checkpoint)
    split = load_retrieval_split(existing_path(args.data, "path", "--data"), _image_root(args.image_root),
                                 CsvFormat(args.csv_separator, args.csv_img_key, args.csv_caption_key))
    k_test_for_gallery(args.k_test, name="--k-test")  # before the model loads; a small gallery clamps it
    model = VLPModel.from_pretrained(checkpoint).to(_device(args.device))
    config = EvalConfig(k_test=args.k_test, score=args.score, batch_size=args.batch_size, precision=args.precision)
    result = evaluate_retrieval(model, split, model.image_transform(train=False), config,
                                device=_device(args.device),
                                progress=not args.no_progress)
    if args.output:
        plot_recall_curve(result, Path(args.output).with_suffix(".png"))
    _write(result, args.output)
    return 0


def _baseline_training_questions(value: str, checkpoint: Path) -> list[dict[str, Any]] | None:
    """The training questions of ``--train-data``: a file, 'synthetic', 'none', or 'auto' (what the
    checkpoint's fine-tuning run recorded: its vqa.train, else the synthetic questions it trained on)."""
    from vlp.eval.vqa_baselines import read_vqa_answers
    from vlp.models.persist import read_checkpoint_config

    if value == "none":
        return None
    run = read_checkpoint_config(checkpoint).get("run")
    run = run if isinstance(run, dict) else {}
    vqa, data = run.get("vqa") or {}, run.get("data") or {}
    if value == "auto":
        recorded = str(vqa.get("train") or "")
        if recorded:
            if not Path(recorded).is_file():
                raise UserError(f"--train-data: the checkpoint's training questions (vqa.train: {recorded}) are not "
                                "found; pass --train-data FILE (or 'none' to leave out the baselines)")
            return read_vqa_answers(recorded)
        if data.get("source") != "synthetic":
            raise UserError(f"--train-data: {checkpoint} records no VQA training questions; pass --train-data FILE "
                            "(or 'none' to leave out the baselines)")
        value = "synthetic"
    if value == "synthetic":
        from vlp.data.synthetic import SyntheticScenes
        from vlp.data.vqa_data import synthetic_vqa

        size, seed = int(data.get("synthetic_train_size", 20000)), int(data.get("synthetic_seed", 0))
        return synthetic_vqa(SyntheticScenes(size, seed=seed, split="train"))
    return read_vqa_answers(existing_path(value, "file", "--train-data"))


def cmd_eval_vqa(args: argparse.Namespace) -> int:
    from vlp.data.retrieval_split import load_image_file
    from vlp.data.vqa_data import load_vqa
    from vlp.eval.vqa_baselines import AnswerPriors
    from vlp.train.finetune import evaluate_vqa_split, load_vqa_checkpoint, require_vqa_files

    checkpoint = checkpoint_dir(args.checkpoint)
    questions = load_vqa(existing_path(args.data, "path", "--data"), _image_root(args.image_root))
    require_vqa_files(Path(checkpoint))  # first: a checkpoint without a VQA head says so
    train_questions = _baseline_training_questions(args.train_data, checkpoint)
    priors = None if train_questions is None else AnswerPriors.fit(train_questions)
    vqa_model, vocab = load_vqa_checkpoint(checkpoint)
    device = _device(args.device)
    predictions, metrics = evaluate_vqa_split(vqa_model.to(device), vocab, questions, load_image_file,
                                              args.batch_size, device, not args.no_progress, args.precision,
                                              priors=priors)
    if args.output:
        out = Path(args.output)
        predictions_path = out.with_name(out.stem + "_predictions.json")
        predictions_path.parent.mkdir(parents=True, exist_ok=True)
        predictions_path.write_text(json.dumps(predictions))
        metrics = {**metrics, "predictions": str(predictions_path)}
    _write(metrics, args.output)
    return 0


def cmd_eval_zeroshot(args: argparse.Namespace) -> int:
    from vlp.data.vqa_data import load_zeroshot
    from vlp.eval.zeroshot import default_templates, evaluate_zeroshot
    from vlp.models import VLPModel

    checkpoint = checkpoint_dir(args.checkpoint)
    split = load_zeroshot(existing_path(args.data, "path", "--data"), _image_root(args.image_root),
                          existing_path(args.classes, "path", "--classes"))
    model = VLPModel.from_pretrained(checkpoint).to(_device(args.device))
    templates = default_templates(model, split.classes)
    if args.templates:
        templates = json.loads(existing_path(args.templates, "path", "--templates").read_text())
    result = evaluate_zeroshot(model, split, model.image_transform(train=False), split.classes, templates,
                               batch_size=args.batch_size, precision=args.precision, device=_device(args.device),
                               progress=not args.no_progress, itm_rerank_k=args.itm_k if model.has_fusion else 0,
                               details=True, score=args.score)
    predictions = result.pop("predictions")
    if split.image_paths is not None:
        for row in predictions:
            row["image"] = str(split.image_paths[row["index"]])
    if args.output:
        out = Path(args.output)
        predictions_path = out.with_name(out.stem + "_predictions.json")
        predictions_path.parent.mkdir(parents=True, exist_ok=True)
        predictions_path.write_text(json.dumps(predictions, indent=1))
        result["predictions"] = str(predictions_path)
    _write(result, args.output)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from vlp.config import load_config
    from vlp.train.finetune import finetune_retrieval, finetune_vqa

    config_path = existing_path(args.config, "path", "CONFIG")
    init = checkpoint_dir(args.init, "--init")
    from vlp.models.persist import read_checkpoint_config

    model_section = read_checkpoint_config(init)["model"]
    config = load_config(config_path, args.set, model=model_section)
    run = finetune_vqa if args.task == "vqa" else finetune_retrieval
    print(run(config, init, output_dir=args.output_dir, resume=args.resume, overwrite=args.overwrite))
    return 0


def _eval_options(parser: argparse.ArgumentParser, data_help: str) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a checkpoint directory, or a run directory (its final/ is used) (required)")
    parser.add_argument("--data", required=True, metavar="FILE", help=data_help + " (required)")
    parser.add_argument("--image-root", required=True, metavar="DIR",
                        help="directory the image paths in --data are relative to (required)")
    parser.add_argument("--output", default=None, metavar="FILE.json",
                        help="also write the result JSON here (default: print it only)")
    parser.add_argument("--batch-size", type=int, default=128, metavar="N",
                        help="images or captions encoded per batch (default: %(default)s)")
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                        help="auto: bf16 on CUDA with bf16 support, fp32 on every CPU (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda when available, else cpu (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars (default: shown)")


def add_csv_options(parser: argparse.ArgumentParser) -> None:
    """open_clip's names for reading a CSV/TSV pairs file (a --data ending in .csv or .tsv)."""
    parser.add_argument("--csv-separator", default="\t", metavar="SEP",
                        help="column separator of a .csv/.tsv --data file; \\t = tab (default: tab)")
    parser.add_argument("--csv-img-key", default="filepath", metavar="COLUMN",
                        help="column of a .csv/.tsv --data file with the image paths (default: %(default)s)")
    parser.add_argument("--csv-caption-key", default="title", metavar="COLUMN",
                        help="column of a .csv/.tsv --data file with the captions (default: %(default)s)")


def add_eval_commands(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    ev = sub.add_parser("eval", help="evaluate a checkpoint")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    r = ev_sub.add_parser("retrieval", help="image-text retrieval: ITC ranking + ITM re-ranking of the top k")
    _eval_options(r, "retrieval test split: JSON/JSONL of {image, caption (a string or a list)}, or a CSV/TSV "
                     "(.csv/.tsv, see --csv-separator)")
    r.add_argument("--k-test", type=int, default=16, metavar="K",
                   help="candidates per query re-ranked by the ITM head of a fused model (default: %(default)s)")
    r.add_argument("--score", choices=RERANK_SCORES, default="itm",
                   help="re-ranking score: the ITM head's log-odds (logit 1 - logit 0), its match logit alone "
                        "(ALBEF/BLIP), the log-odds + ITC cosine (BLIP's sum), or the log-odds + ITC logit "
                        "(default: %(default)s)")
    add_csv_options(r)
    add_common(r)
    r.set_defaults(handler=cmd_eval_retrieval)
    v = ev_sub.add_parser("vqa", help="VQA predictions and the official VQA accuracy")
    _eval_options(v, "VQA questions: JSON/JSONL of {question_id, image, question, answer (human answers), "
                     "answer_type}")
    v.add_argument("--train-data", default="auto", metavar="FILE|auto|synthetic|none",
                   help="training questions (vlp VQA JSON/JSONL; its images are not read) for the image-blind "
                        "baselines reported beside the accuracy: question-only (each question's most frequent "
                        "training answer) and majority answer. auto: those the checkpoint was fine-tuned on (its "
                        "vqa.train, or the synthetic questions); synthetic: the built-in synthetic training "
                        "questions; none: no baselines (default: %(default)s)")
    add_common(v)
    v.set_defaults(handler=cmd_eval_vqa)
    z = ev_sub.add_parser("zeroshot", help="zero-shot classification (ITC; ITM re-scoring for fused models)")
    _eval_options(z, "labelled images: JSON/JSONL of {image, label}, or a folder with one subfolder per class")
    z.add_argument("--classes", required=True, metavar="FILE",
                   help="JSON list of the class names (required)")
    z.add_argument("--templates", default=None, metavar="FILE",
                   help="JSON list of prompt templates with {} for the class name (default: \"a photo of a {}.\"; "
                        "synthetic-vocabulary prompts for a checkpoint with the synthetic tokenizer)")
    z.add_argument("--itm-k", type=int, default=5, metavar="K",
                   help="top classes per image re-scored by the ITM head of a fused model (default: %(default)s)")
    z.add_argument("--score", choices=RERANK_SCORES, default="itm",
                   help="re-scoring rule, as for retrieval: the ITM log-odds, its match logit alone, or the log-odds "
                        "+ the class's ITC cosine or ITC logit (default: %(default)s)")
    add_common(z)
    z.set_defaults(handler=cmd_eval_zeroshot)


def add_finetune_commands(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("finetune", help="fine-tune a checkpoint for VQA or retrieval")
    p.add_argument("task", choices=("vqa", "retrieval"), help="vqa: a new answer head; retrieval: ITC + ITM")
    p.add_argument("config", metavar="CONFIG", help="the fine-tuning YAML config (its model comes from --init)")
    p.add_argument("--init", required=True, metavar="DIR",
                   help="pretrained checkpoint directory, or a run directory (its final/) (required)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable; default: none)")
    p.add_argument("--output-dir", default=None, metavar="DIR", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in the run directory (default: off)")
    add_overwrite(p)
    add_common(p)
    p.set_defaults(handler=cmd_finetune)
