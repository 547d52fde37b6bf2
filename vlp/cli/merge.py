"""``vlp merge``: WiSE-FT weight-space ensembles of a zero-shot and a fine-tuned checkpoint (vlp.train.merge)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlp.errors import UserError

__all__ = ["add_command", "cmd_merge", "parse_alphas"]


def parse_alphas(value: str) -> list[float]:
    """``0.5`` or ``0,0.25,0.5`` -> floats in [0, 1]; anything else is one error line."""
    try:
        alphas = [float(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--alpha {value}: expected a number or comma-separated numbers in [0, 1]") from None
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
        raise UserError(f"--alpha {value}: every alpha must be in [0, 1]")
    return alphas


def cmd_merge(args: argparse.Namespace) -> int:
    from vlp.cli.arguments import checkpoint_dir, existing_path

    alphas = parse_alphas(args.alpha)
    zs, ft = checkpoint_dir(args.zero_shot, "CKPT_ZS"), checkpoint_dir(args.fine_tuned, "CKPT_FT")
    given = {flag: value for flag, value in (("--retrieval", args.retrieval), ("--zeroshot", args.zeroshot),
                                             ("--vqa", args.vqa)) if value}
    if args.zeroshot and not args.classes:
        raise UserError("--zeroshot needs --classes (a JSON list of class names)")
    if given and not args.image_root:
        raise UserError(f"{', '.join(given)} need --image-root (the directory their image paths are relative to)")
    if len(alphas) == 1 and not given:
        from vlp.train.merge import merge_checkpoints

        print(merge_checkpoints(zs, ft, alphas[0], Path(args.out)))
        return 0
    from vlp.train.merge import SweepData, sweep

    data = SweepData(
        image_root=existing_path(args.image_root, "directory", "--image-root") if args.image_root else Path("."),
        retrieval=existing_path(args.retrieval, "path", "--retrieval") if args.retrieval else None,
        zeroshot=existing_path(args.zeroshot, "path", "--zeroshot") if args.zeroshot else None,
        classes=existing_path(args.classes, "file", "--classes") if args.classes else None,
        vqa=existing_path(args.vqa, "path", "--vqa") if args.vqa else None,
        k_test=args.k_test, batch_size=args.batch_size, device=_device(args.device), precision=args.precision)
    rows = sweep(zs, ft, alphas, Path(args.out), data, x=args.x, y=args.y)
    print((Path(args.out) / "sweep.md").read_text(), end="")
    print(f"{len(rows)} checkpoints, sweep.json, sweep.md and sweep.png in {args.out}")
    return 0


def _device(value: str) -> str:
    import torch

    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return value


def add_command(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("merge", help="WiSE-FT: interpolate a zero-shot and a fine-tuned checkpoint",
                       description="theta = (1 - alpha) theta_zs + alpha theta_ft. One alpha and no evaluation data: "
                                   "the merged checkpoint is written to --out. Several alphas (or evaluation data): "
                                   "--out/alpha_A/ for each, evaluated on the data given, with sweep.json, "
                                   "sweep.md (a table) and sweep.png (metrics over alpha and the trade-off curve).")
    p.add_argument("zero_shot", metavar="CKPT_ZS", help="the zero-shot (pretrained) checkpoint (alpha 0)")
    p.add_argument("fine_tuned", metavar="CKPT_FT", help="the fine-tuned checkpoint (alpha 1); its task heads are kept")
    p.add_argument("--alpha", required=True, metavar="A[,A...]", help="mixing coefficient(s) in [0, 1] (required)")
    p.add_argument("--out", required=True, metavar="DIR", help="output checkpoint (one alpha) or sweep directory")
    p.add_argument("--retrieval", metavar="FILE", help="evaluate image-text retrieval on this split (R@1) (default: none)")
    p.add_argument("--zeroshot", metavar="FILE", help="evaluate zero-shot classification on this file (top-1) (default: none)")
    p.add_argument("--classes", metavar="FILE", help="class names of --zeroshot (JSON list; default: none)")
    p.add_argument("--vqa", metavar="FILE", help="evaluate VQA accuracy on these questions (a VQA fine-tuned CKPT_FT; default: none)")
    p.add_argument("--image-root", metavar="DIR", help="directory the image paths of the evaluation files are relative to (default: none; required with evaluation files)")
    p.add_argument("--x", default="", metavar="METRIC", help="trade-off plot x axis (default: the first metric)")
    p.add_argument("--y", default="", metavar="METRIC", help="trade-off plot y axis (default: the last metric)")
    p.add_argument("--k-test", type=int, default=16, metavar="K", help="ITM re-ranking candidates (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, metavar="N", help="evaluation batch size (default: %(default)s)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="evaluation precision; auto = bf16 on CUDA with bf16, fp32 on CPU (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    add_common(p)
    p.set_defaults(handler=cmd_merge)
