"""``vlp convert --from {open_clip,clip,blip_itm,vilt,siglip} SRC --out DIR``: import a pretrained checkpoint."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["add_command", "cmd_convert"]


def cmd_convert(args: argparse.Namespace) -> int:
    from vlp.convert import convert

    report = convert(args.source_type, args.src, args.out, model=args.model, tokenizer=args.tokenizer)
    print(report.summary())
    return 0


# Spelled out here so that building the parser does not import the converters (torch, transformers);
# tests/test_convert.py checks it equals vlp.convert.SOURCES.
SOURCES = ("open_clip", "clip", "blip_itm", "vilt", "siglip")


def add_command(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("convert", help="convert a local Hugging Face / open_clip checkpoint into a vlp checkpoint",
                       description="Map a local checkpoint's weights onto vlp's encoders, fusion and heads and write "
                                   "a vlp checkpoint (with the source's tokenizer and image mean/std) plus "
                                   "conversion.json. The exact mapping is in docs/convert.md.")
    p.add_argument("--from", dest="source_type", required=True, choices=SOURCES,
                   help="vilt: ViltModel/ViltForImageAndTextRetrieval; blip_itm: BlipForImageTextRetrieval; "
                        "clip: CLIPModel; siglip: SiglipModel (all Hugging Face directories); open_clip: an "
                        "open_clip local-dir or checkpoint file")
    p.add_argument("src", metavar="SRC", help="the source model directory (or an open_clip checkpoint file)")
    p.add_argument("--out", required=True, help="new (or empty) directory for the vlp checkpoint (required)")
    p.add_argument("--model", default=None,
                   help="open_clip checkpoint files only: a built-in model name or a model config JSON "
                        "(default: read from the source)")
    p.add_argument("--tokenizer", default=None,
                   help="a local tokenizer.json or tokenizer directory instead of the source's own "
                        "(default: the source's own)")
    add_common(p)
    p.set_defaults(handler=cmd_convert)
