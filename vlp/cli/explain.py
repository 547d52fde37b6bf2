"""``vlp explain``: Grad-CAM maps of where a caption grounds in an image, saved as a PNG overlay."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlp.cli.arguments import checkpoint_dir

__all__ = ["add_command", "cmd_explain"]


def cmd_explain(args: argparse.Namespace) -> int:
    import json

    from vlp.data.retrieval_split import load_image_file
    from vlp.explain import explain, explanation_summary, save_overlay
    from vlp.models import VLPModel

    checkpoint = checkpoint_dir(args.checkpoint)
    image = load_image_file(args.image)
    model = VLPModel.from_pretrained(checkpoint)
    explanation = explain(model, image, args.text, layer=args.layer)
    out = Path(args.out) if args.out else Path(Path(args.image).stem + "_explain.png")
    save_overlay(image, explanation, out, words=not args.no_words)
    summary = explanation_summary(explanation)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"ITM match probability {explanation.itm_score:.3f} (fusion layer {explanation.layer})")
    if "note" in summary:
        print(f"note: {summary['note']}")
    print(out)
    return 0


def add_command(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("explain", help="Grad-CAM heatmap of where a caption grounds in an image (PNG + JSON)")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a checkpoint directory of a fused model, or a run directory (its final/) (required)")
    p.add_argument("--image", required=True, metavar="IMG", help="the image file to explain (required)")
    p.add_argument("--text", required=True, help="the caption whose grounding is drawn (required)")
    p.add_argument("--out", default=None, metavar="PNG",
                   help="output PNG; the map peaks and all-zero flags go to the same name with .json "
                        "(default: <image name>_explain.png in the current directory)")
    p.add_argument("--layer", type=int, default=None,
                   help="fusion layer (negative counts from the end) (default: the second-to-last)")
    p.add_argument("--no-words", action="store_true", help="leave out the per-word maps (default: drawn)")
    add_common(p)
    p.set_defaults(handler=cmd_explain)
