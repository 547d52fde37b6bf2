"""WiSE-FT (Wortsman et al. 2022): weight-space ensembles of a zero-shot and a fine-tuned checkpoint.

``merge_checkpoints(zs, ft, alpha, out)`` writes ``theta = (1 - alpha) theta_zs + alpha theta_ft`` for every
floating-point tensor the two checkpoints share; alpha 0 and 1 copy the endpoints exactly. Tensors and weight
files only the fine-tuned checkpoint has (task heads: ``vqa_head.safetensors``) are copied from it, as are its
other files (config, tokenizer, answer vocabulary): the result is a checkpoint of the fine-tuned kind. The two
must be the same architecture: the same ``model`` section in config.yaml and the same tensor shapes; anything
else is one error line. ``sweep`` merges several alphas and evaluates each on the data it is given.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from vlp.errors import UserError
from vlp.precision import DEFAULT_PRECISION

__all__ = ["merge_state", "merge_checkpoints", "MERGED_FILES_SKIPPED", "SweepData", "sweep", "plot_sweep", "alpha_dir"]

# resume-only state of a training checkpoint: not part of a merged model
MERGED_FILES_SKIPPED = ("objective.safetensors", "ema.safetensors", "trainer_state.pt", "COMPLETE")


def merge_state(zs: dict[str, Tensor], ft: dict[str, Tensor], alpha: float, source: str = "") -> dict[str, Tensor]:
    """``(1 - alpha) zs + alpha ft`` per shared floating tensor; ft's own keys and non-float tensors from ft."""
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"--alpha {alpha}: must be in [0, 1]")
    where = f"{source}: " if source else ""
    wrong = [f"{k} {list(zs[k].shape)} vs {list(v.shape)}" for k, v in ft.items() if k in zs and zs[k].shape != v.shape]
    if wrong:
        raise UserError(f"{where}tensor shapes differ (zero-shot vs fine-tuned), not the same architecture: "
                        + ", ".join(wrong[:4]) + (f" (+{len(wrong) - 4} more)" if len(wrong) > 4 else ""))
    only_zs = sorted(set(zs) - set(ft))
    if only_zs:
        raise UserError(f"{where}tensors only in the zero-shot checkpoint, not the same architecture: "
                        + ", ".join(only_zs[:4]))
    merged = {}
    for key, value in ft.items():
        base = zs.get(key)
        if base is None or not value.is_floating_point() or alpha == 1.0:
            merged[key] = value.clone()
        elif alpha == 0.0:
            merged[key] = base.to(value.dtype).clone()
        else:  # in fp32 at least, back to the fine-tuned dtype
            wide = torch.promote_types(value.dtype, torch.float32)
            merged[key] = torch.lerp(base.to(wide), value.to(wide), alpha).to(value.dtype)
    return merged


def _model_section(directory: Path) -> dict[str, Any]:
    """The checkpoint's model config with every default filled in (a checkpoint written before a key existed
    compares equal to one that spells out its default)."""
    from vlp.config.io import from_dict, to_dict
    from vlp.config.schema import ModelConfig
    from vlp.models.persist import read_checkpoint_config

    section = read_checkpoint_config(directory).get("model")
    if not isinstance(section, dict):
        raise UserError(f"{directory / 'config.yaml'}: no 'model' mapping")
    full: dict[str, Any] = to_dict(from_dict(ModelConfig, section, prefix="model"))
    return full


def _differences(a: Any, b: Any, prefix: str = "model") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b)) if key != "name"
                for d in _differences(a.get(key), b.get(key), f"{prefix}.{key}")]
    return [] if a == b else [f"{prefix} {a!r} vs {b!r}"]


def merge_checkpoints(zs_dir: str | Path, ft_dir: str | Path, alpha: float, out_dir: str | Path) -> Path:
    """Write the WiSE-FT checkpoint of ``alpha`` to ``out_dir`` (atomically); returns it."""
    from vlp.train import checkpoint as ckpt

    zs, ft, out = Path(zs_dir), Path(ft_dir), Path(out_dir)
    differ = _differences(_model_section(zs), _model_section(ft))
    if differ:
        raise UserError(f"{zs} and {ft} are not the same architecture: " + "; ".join(differ[:3]))
    if out.resolve() in (zs.resolve(), ft.resolve()):
        raise UserError(f"--out {out}: would overwrite an input checkpoint")

    def write(directory: Path) -> None:
        for entry in ft.iterdir():
            if entry.name in MERGED_FILES_SKIPPED:
                continue
            target = directory / entry.name
            if entry.is_dir():
                shutil.copytree(entry, target)
            elif entry.suffix == ".safetensors" and (zs / entry.name).is_file():
                state = merge_state(ckpt.load_tensors(zs / entry.name), ckpt.load_tensors(entry), alpha,
                                    source=entry.name)
                ckpt.save_tensors(target, state)
            else:
                shutil.copy2(entry, target)
        config = yaml.safe_load((directory / "config.yaml").read_text()) or {}
        config["wise_ft"] = {"alpha": float(alpha), "zero_shot": str(zs), "fine_tuned": str(ft)}
        (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    return ckpt.write_atomic(out, write)


def alpha_dir(out: Path, alpha: float) -> Path:
    return out / f"alpha_{alpha:.2f}"


@dataclass
class SweepData:
    """The evaluation data of a sweep: each kind is evaluated when its file is given."""

    image_root: Path
    retrieval: Path | None = None
    zeroshot: Path | None = None
    classes: Path | None = None
    vqa: Path | None = None
    k_test: int = 16
    batch_size: int = 128
    device: str = "cpu"
    precision: str = DEFAULT_PRECISION


def _evaluate(checkpoint: Path, data: SweepData) -> dict[str, float]:
    """Headline metrics of one merged checkpoint (percent)."""
    from vlp.models import VLPModel

    scores: dict[str, float] = {}
    model = VLPModel.from_pretrained(checkpoint).to(data.device)
    if data.zeroshot is not None and data.classes is not None:
        from vlp.data.vqa_data import load_zeroshot
        from vlp.eval.zeroshot import DEFAULT_TEMPLATES, evaluate_zeroshot

        split = load_zeroshot(data.zeroshot, data.image_root, data.classes)
        templates = list(DEFAULT_TEMPLATES)
        if model.config.text.tokenizer == "synthetic":  # prompts in the synthetic vocabulary
            from vlp.data.synthetic import COLORS, ZEROSHOT_TEMPLATES

            templates = list(ZEROSHOT_TEMPLATES["color" if set(split.classes) & set(COLORS) else "shape"])
        result = evaluate_zeroshot(model, split, model.image_transform(train=False), split.classes, templates,
                                   batch_size=data.batch_size, precision=data.precision, device=data.device,
                                   progress=False)
        scores["zeroshot_top1"] = float(result["itc_top1"])
    if data.retrieval is not None:
        from vlp.config.schema import EvalConfig
        from vlp.data.retrieval_split import load_retrieval_split
        from vlp.eval.retrieval import evaluate_retrieval

        pairs = load_retrieval_split(data.retrieval, data.image_root)
        config = EvalConfig(k_test=data.k_test, batch_size=data.batch_size, precision=data.precision)
        retrieval = evaluate_retrieval(model, pairs, model.image_transform(train=False), config,
                                       device=data.device,
                                       progress=False)
        for kind, recalls in (("itc", retrieval["itc"]), ("itm", retrieval.get("itm"))):
            if recalls is not None:
                scores[f"{kind}_img_r1"] = float(recalls["img_r1"])  # text -> image
                scores[f"{kind}_txt_r1"] = float(recalls["txt_r1"])  # image -> text
    if data.vqa is not None:
        from vlp.data.retrieval_split import load_image_file
        from vlp.data.vqa_data import load_vqa
        from vlp.train.finetune import evaluate_vqa_split, load_vqa_checkpoint

        vqa_model, vocab = load_vqa_checkpoint(checkpoint)
        _, metrics = evaluate_vqa_split(vqa_model.to(data.device), vocab, load_vqa(data.vqa, data.image_root),
                                        load_image_file, data.batch_size, data.device, False, data.precision)
        scores["vqa_overall"] = float(metrics["overall"] or 0.0)
    return scores


def plot_sweep(rows: list[dict[str, float]], path: Path, x: str, y: str, title: str) -> None:
    """Left: every metric against alpha; right: the trade-off curve ``y`` against ``x``, points labelled by alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [row["alpha"] for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in (k for k in rows[0] if k != "alpha"):
        left.plot(alphas, [row[key] for row in rows], marker="o", label=key)
    left.set(xlabel="alpha (0 = zero-shot, 1 = fine-tuned)", ylabel="percent", title="metrics over alpha")
    left.legend(fontsize=8)
    right.plot([row[x] for row in rows], [row[y] for row in rows], marker="o")
    for row in rows:
        right.annotate(f"{row['alpha']:g}", (row[x], row[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    right.set(xlabel=x, ylabel=y, title="trade-off")
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def sweep(zs_dir: str | Path, ft_dir: str | Path, alphas: list[float], out_dir: str | Path,
          data: SweepData, x: str = "", y: str = "") -> list[dict[str, float]]:
    """Merge every alpha into ``out_dir/alpha_A/``, evaluate each, write ``sweep.json``, ``sweep.md`` and
    ``sweep.png`` (the trade-off of metric ``y`` against ``x``: by default the first and the last metric);
    returns the rows ({"alpha", metric: value})."""
    import json

    out = Path(out_dir)
    rows = []
    for alpha in alphas:
        merged = merge_checkpoints(zs_dir, ft_dir, alpha, alpha_dir(out, alpha))
        rows.append({"alpha": alpha, **_evaluate(merged, data)})
        keys = [k for k in rows[0] if k != "alpha"]
        for name, value in (("--x", x), ("--y", y)):  # known after the first evaluation
            if value and value not in keys:
                raise UserError(f"{name} {value}: not a measured metric; measured: {', '.join(keys)}")
    (out / "sweep.json").write_text(json.dumps(rows, indent=2))
    lines = ["| alpha | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {row['alpha']:.2f} | " + " | ".join(f"{row[k]:.1f}" for k in keys) + " |" for row in rows]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    if keys:
        plot_sweep(rows, out / "sweep.png", x or keys[0], y or keys[-1],
                   f"WiSE-FT: {Path(zs_dir)} (alpha 0) to {Path(ft_dir)} (alpha 1)")
    return rows
