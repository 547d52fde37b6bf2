"""Import pretrained checkpoints from other libraries as vlp checkpoints.

``convert(source_type, src, out_dir)`` maps the weights of a local Hugging Face model directory
(``vilt``: ViltModel / ViltForImageAndTextRetrieval, ``blip_itm``: BlipForImageTextRetrieval, ``clip``:
CLIPModel, ``siglip``: SiglipModel) or an open_clip checkpoint (``open_clip``) onto vlp's encoders, fusion
and heads and writes a checkpoint with ``VLPModel.save_pretrained`` plus ``conversion.json`` (the report).
The tokenizer and the image mean/std come from the source, offline. Every source tensor must be used and
every vlp tensor set (a documented few keep their config value, e.g. ViLT's unused temperature); anything
else fails with one line naming the tensors. docs/convert.md lists the exact mapping.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from vlp.convert.common import ConversionReport, Plan, StateMapper
from vlp.errors import UserError

__all__ = ["convert", "ConversionReport", "SOURCES"]

SOURCES = ("open_clip", "clip", "blip_itm", "vilt", "siglip")


def _planner(source_type: str) -> Callable[[Path, str | None, str | None], Plan]:
    if source_type == "open_clip":
        from vlp.convert.open_clip_source import open_clip_plan

        return open_clip_plan
    if source_type == "clip":
        from vlp.convert.clip import clip_plan

        return lambda src, _model, tokenizer: clip_plan(src, tokenizer)
    if source_type == "blip_itm":
        from vlp.convert.blip import blip_plan

        return lambda src, _model, tokenizer: blip_plan(src, tokenizer)
    if source_type == "vilt":
        from vlp.convert.vilt import vilt_plan

        return lambda src, _model, tokenizer: vilt_plan(src, tokenizer)
    if source_type == "siglip":
        from vlp.convert.siglip import siglip_plan

        return lambda src, _model, tokenizer: siglip_plan(src, tokenizer)
    raise UserError(f"unknown source type '{source_type}'; known: {', '.join(SOURCES)}")


def convert(source_type: str, src: str | Path, out_dir: str | Path, model: str | None = None,
            tokenizer: str | None = None) -> ConversionReport:
    """Convert ``src`` (a local directory or, for open_clip, a checkpoint file) into a vlp checkpoint in ``out_dir``.

    ``model``: open_clip only, the model name or config JSON of a checkpoint file. ``tokenizer``: a local
    tokenizer file or directory to use instead of the source's own.
    """
    from vlp.models import build_model

    if model and source_type != "open_clip":
        raise UserError(f"--model is only used with --from open_clip, not {source_type}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty directory")
    plan = _planner(source_type)(Path(src).expanduser(), model, tokenizer)
    vlp_model = build_model(plan.config, tokenizer=plan.tokenizer)
    mapper = StateMapper(plan.tensors, vlp_model.state_dict(), str(src))
    plan.fill(mapper)
    state, report = mapper.finish(plan.defaulted)
    vlp_model.load_state_dict(state, strict=True)
    vlp_model.eval()
    vlp_model.save_pretrained(out)
    report.source_type, report.output, report.notes = source_type, str(out), list(plan.notes)
    (out / "conversion.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report
