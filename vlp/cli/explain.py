"""``vlp explain``: Grad-CAM maps of where a caption grounds in an image, saved as a PNG overlay."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlp.cli.eval_commands import checkpoint_dir

__all__ = ["add_command", "cmd_explain"]


def cmd_explain(args: argparse.Namespace) -> int:
    from vlp.data.retrieval_split import load_image_file
    from vlp.explain import explain, save_overlay
    from vlp.models import VLPModel

    checkpoint = checkpoint_dir(args.checkpoint)
    image = load_image_file(args.image)
    model = VLPModel.from_pretrained(checkpoint)
    explanation = explain(model, image, args.text, layer=args.layer)
    out = Path(args.out) if args.out else Path(Path(args.image).stem + "_explain.png")
    save_overlay(image, explanation, out, words=not args.no_words)
    print(f"ITM match probability {explanation.itm_score:.3f} (fusion layer {explanation.layer})")
    print(out)
    return 0


def add_command(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("explain", help="Grad-CAM heatmap of where a caption grounds in an image (PNG)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory of a fused model")
    p.add_argument("--image", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--out", default=None, help="output PNG (default <image name>_explain.png here)")
    p.add_argument("--layer", type=int, default=None,
                   help="fusion layer (negative counts from the end; default the second-to-last)")
    p.add_argument("--no-words", action="store_true", help="leave out the per-word maps")
    add_common(p)
    p.set_defaults(handler=cmd_explain)
