"""Training steps: vlp's CLIP-style model vs open_clip's own step, and the fused pretraining step's MFU.

(a) ViT-S/16 at 224 px + open_clip's ViT-S-16 text tower shape (12 layers, width 384, 77 tokens), batch B,
    AdamW, bf16 autocast. open_clip's step is its ``train_one_epoch`` body: forward, ``ClipLoss``,
    backward, ``AdamW.step`` (its two weight-decay groups, torch's default CPU implementation),
    ``zero_grad``, logit-scale clamp. vlp's step is what its trainer runs: ``PretrainObjective.training_step``
    (ITC only), ``build_optimizer``'s AdamW step, ``zero_grad``. Two vlp models: the native towers
    (``vit`` + causal ``transformer`` with EOS pooling: vlp's own layers), and the ``clip_base`` preset
    at ViT-S-16 (open_clip's towers inside vlp). Both sides get the same 77-token ids.
    Target: vlp >= 1.2x open_clip's samples/s in bf16.
(b) The fused pretraining step of a small ALBEF-style config (ViT-S/16, 6-layer text, 3 one-way fusion
    layers; ITC + ITM with hard negatives, optimizer included): samples/s, model FLOPs (counted by
    ``torch.utils.flop_counter`` over forward + backward) per second against the in-run matmul peaks
    (aim: 30% of the bf16 peak), and the torch.profiler table of one step in the JSON.

    python benchmarks/bench_train.py [--size tiny|quick|full] [--reps N] [--threads N]
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from common import Report, base_parser, interleaved, matmul_peak, median, paired_ratio, setup, sizes_for
from torch import Tensor

SIZES = {
    "tiny": {"batch": 2, "image_size": 32, "patch": 16, "width": 64, "heads": 2, "image_layers": 1, "text_layers": 1,
             "fusion_layers": 1, "fused_text_layers": 1, "context": 77, "reps": 1, "precisions": ["bf16"]},
    "quick": {"batch": 16, "image_size": 224, "patch": 16, "width": 384, "heads": 6, "image_layers": 12,
              "text_layers": 12, "fusion_layers": 3, "fused_text_layers": 6, "context": 77, "reps": 1,
              "precisions": ["bf16"]},
    "full": {"batch": 16, "image_size": 224, "patch": 16, "width": 384, "heads": 6, "image_layers": 12,
             "text_layers": 12, "fusion_layers": 3, "fused_text_layers": 6, "context": 77, "reps": 4,
             "precisions": ["bf16", "fp32"]},
}
TARGET = 1.2
MFU_AIM = 0.30
LR, BETAS, EPS, WEIGHT_DECAY = 5e-4, (0.9, 0.98), 1e-6, 0.2


def _autocast(precision: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    if precision == "bf16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _inputs(cfg: dict[str, Any], full_length: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Images, open_clip token ids [B, 77] and vlp's mask of the real tokens (up to each EOT).

    Captions of 5-16 words (padded to 77, as open_clip always pads), or with ``full_length`` captions that
    fill all 77 positions (no padding: the same work for both sides, nothing vlp can skip)."""
    from open_clip.tokenizer import SimpleTokenizer

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(cfg["batch"], 3, cfg["image_size"], cfg["image_size"], generator=gen)
    words = ["a", "photo", "of", "red", "small", "dog", "cat", "on", "the", "grass", "two", "people", "near", "car"]
    length = (lambda i: cfg["context"]) if full_length else (lambda i: 5 + (i * 3) % 12)
    captions = [" ".join(words[(i * 7 + j) % len(words)] for j in range(length(i))) for i in range(cfg["batch"])]
    tokenizer = SimpleTokenizer()
    ids = tokenizer(captions, context_length=cfg["context"])
    end = ids.argmax(dim=1)  # EOT is the largest id
    mask = torch.arange(cfg["context"])[None, :] <= end[:, None]
    return images, ids, mask


# ------------------------------------------------------------------------------------------ (a) CLIP step
def open_clip_step(cfg: dict[str, Any], images: Tensor, ids: Tensor, precision: str) -> Callable[[], None]:
    """open_clip's training step on its own model (random init), as its train.py runs it."""
    import open_clip
    from open_clip.loss import ClipLoss

    model_cfg: dict[str, Any] = {
        "embed_dim": cfg["width"],
        "vision_cfg": {"image_size": cfg["image_size"], "layers": cfg["image_layers"], "width": cfg["width"],
                       "patch_size": cfg["patch"], "head_width": cfg["width"] // cfg["heads"]},
        "text_cfg": {"context_length": cfg["context"], "vocab_size": 49408, "width": cfg["width"],
                     "heads": cfg["heads"], "layers": cfg["text_layers"]},
    }
    model = open_clip.CLIP(**model_cfg).train()
    loss = ClipLoss()

    def exclude(name: str, param: Tensor) -> bool:  # open_clip main.py's no-weight-decay rule
        return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": WEIGHT_DECAY},
    ], lr=LR, betas=BETAS, eps=EPS)
    autocast = _autocast(precision)

    def step() -> None:
        with autocast():
            image_features, text_features, logit_scale = model(images, ids)[:3]
            total = loss(image_features, text_features, logit_scale)
        total.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return step


def vlp_clip_model(cfg: dict[str, Any], native: bool) -> Any:
    from vlp.models import VLPModel

    if native:
        image = {"type": "vit", "image_size": cfg["image_size"], "patch_size": cfg["patch"], "width": cfg["width"],
                 "depth": cfg["image_layers"], "num_heads": cfg["heads"]}
        text = {"type": "transformer", "tokenizer": "clip", "width": cfg["width"], "depth": cfg["text_layers"],
                "num_heads": cfg["heads"], "max_length": cfg["context"], "causal": True, "pooling": "eos"}
        embed_dim = cfg["width"]
    else:
        shape = {"layers": cfg["image_layers"], "width": cfg["width"], "patch_size": cfg["patch"],
                 "head_width": cfg["width"] // cfg["heads"]}
        image = {"type": "open_clip", "image_size": cfg["image_size"], "options": {**shape, "embed_dim": cfg["width"]}}
        text = {"type": "open_clip", "tokenizer": "clip", "max_length": cfg["context"], "causal": True,
                "pooling": "eos", "width": cfg["width"], "num_heads": cfg["heads"], "depth": cfg["text_layers"],
                "options": {"embed_dim": cfg["width"]}}
        embed_dim = 0
    return VLPModel.from_config({
        "name": "bench_clip", "image": image, "text": text, "fusion": {"type": "none"}, "embed_dim": embed_dim,
        "temperature": 0.07, "temperature_min": 0.01, "temperature_max": 100.0, "itm_head": False, "mlm_head": False,
    }).train()


def vlp_step(model: Any, batch: dict[str, Tensor], precision: str, itm: bool) -> tuple[Callable[[], None], Any]:
    """The trainer's step: objective forward + backward, AdamW (vlp's build_optimizer), zero_grad, hooks."""
    from vlp.config import ObjectiveConfig, OptimConfig
    from vlp.objectives.pretrain import PretrainObjective
    from vlp.train.optim import build_optimizer

    objective = PretrainObjective(model, ObjectiveConfig(itc_weight=1.0, itm_weight=1.0 if itm else 0.0),
                                  autocast=_autocast(precision))
    optim_cfg = OptimConfig(lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS, eps=EPS, grad_clip=0.0)
    optimizer = build_optimizer(model, optim_cfg, LR, "cpu")

    def step() -> None:
        objective.training_step(batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.after_optimizer_step()

    return step, objective


def bench_clip(report: Report, cfg: dict[str, Any], reps: int) -> None:
    """The target figure on captions padded to 77 (what open_clip's loader gives; vlp skips the all-padding
    columns and the last blocks' unread rows), and the same on captions filling all 77 tokens."""
    for full_length in (False, True):
        _bench_clip_inputs(report, cfg, reps, full_length)


def _bench_clip_inputs(report: Report, cfg: dict[str, Any], reps: int, full_length: bool) -> None:
    images, ids, mask = _inputs(cfg, full_length)
    batch = {"images": images, "input_ids": ids, "attention_mask": mask}
    suffix = "_full_length_captions" if full_length else ""
    for precision in cfg["precisions"]:
        steps = {
            "open_clip": open_clip_step(cfg, images, ids, precision),
            "vlp_native": vlp_step(vlp_clip_model(cfg, native=True), batch, precision, itm=False)[0],
            "vlp_open_clip_towers": vlp_step(vlp_clip_model(cfg, native=False), batch, precision, itm=False)[0],
        }
        times = interleaved(steps, reps)
        report.detail(f"clip_{precision}{suffix}_times_seconds",
                      {k: [round(t, 3) for t in v] for k, v in times.items()})
        samples = cfg["batch"]
        for name in ("vlp_native", "vlp_open_clip_towers"):
            report.figure(f"clip_{precision}_{name}{suffix}_speedup", paired_ratio(times["open_clip"], times[name]),
                          "x open_clip samples/s", TARGET if precision == "bf16" and not full_length else None,
                          note=f"vlp {samples / median(times[name]):.2f} samples/s, "
                               f"open_clip {samples / median(times['open_clip']):.2f} samples/s")


# ------------------------------------------------------------------------------------------ (b) fused step
def fused_model(cfg: dict[str, Any]) -> Any:
    from vlp.models import VLPModel

    return VLPModel.from_config({
        "name": "bench_fused",
        "image": {"type": "vit", "image_size": cfg["image_size"], "patch_size": cfg["patch"], "width": cfg["width"],
                  "depth": cfg["image_layers"], "num_heads": cfg["heads"]},
        "text": {"type": "transformer", "tokenizer": "clip", "width": cfg["width"], "depth": cfg["fused_text_layers"],
                 "num_heads": cfg["heads"], "max_length": 40},
        "fusion": {"type": "dual_stream", "depth": cfg["fusion_layers"], "num_heads": cfg["heads"],
                   "update_image": False},
        "embed_dim": 256, "itm_head": True, "mlm_head": False,
    }).train()


def _optimizer_cost(model: Any, reps: int) -> dict[str, float]:
    """Seconds per AdamW step over the model's parameters (random gradients): foreach vs fused, on CPU."""
    from vlp.train.optim import param_groups

    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    optimizers = {kind: torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS, eps=EPS,
                                          **{kind: True}) for kind in ("foreach", "fused")}
    times = interleaved({kind: optimizer.step for kind, optimizer in optimizers.items()}, max(reps, 3))
    model.zero_grad(set_to_none=True)
    return {kind: median(ts) for kind, ts in times.items()}


def bench_fused(report: Report, cfg: dict[str, Any], reps: int, peaks: dict[str, float]) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    images, _, _ = _inputs(cfg)
    model = fused_model(cfg)
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(8, 41, (cfg["batch"],), generator=gen)
    mask = torch.arange(40)[None, :] < lengths[:, None]
    ids = torch.randint(1, 49000, (cfg["batch"], 40), generator=gen).masked_fill(~mask, 0)
    batch = {"images": images, "input_ids": ids, "attention_mask": mask}
    optimizer_seconds = _optimizer_cost(model, reps)
    report.detail("adamw_step_seconds_cpu", optimizer_seconds)
    for precision in cfg["precisions"]:
        step, objective = vlp_step(model, batch, precision, itm=True)
        step()  # warm-up: optimizer state
        counter = FlopCounterMode(display=False)
        with counter:
            objective.training_step(batch)
        model.zero_grad(set_to_none=True)
        flops = float(counter.get_total_flops())
        times = interleaved({"step": step}, reps, warmup=0)["step"]
        seconds = median(times)
        with torch.profiler.profile() as prof:
            step()
        report.detail(f"fused_{precision}_profile", prof.key_averages().table(sort_by="self_cpu_time_total",
                                                                              row_limit=25, max_name_column_width=60))
        report.detail(f"fused_{precision}_times_seconds", [round(t, 3) for t in times])
        report.detail(f"fused_{precision}_flops_per_step", flops)
        report.figure(f"fused_{precision}_samples_per_s", cfg["batch"] / seconds, "samples/s",
                      note=f"{seconds:.2f} s per step of {cfg['batch']}")
        report.figure(f"fused_{precision}_mfu", flops / seconds / 1e9 / peaks[precision],
                      f"of the in-run {precision} matmul peak ({peaks[precision]:.0f} GFLOP/s)",
                      MFU_AIM if precision == "bf16" else None,
                      note=f"{flops / seconds / 1e9:.1f} GFLOP/s model FLOPs (forward + backward)")


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("clip", "fused"), default=None, help="run one of the two parts")
    args = parser.parse_args(argv)
    cfg = sizes_for(args.size, SIZES)
    reps = args.reps or cfg["reps"]
    settings = setup(args)
    report = Report("bench_train", args, {**settings, **cfg, "reps": reps})
    size = 256 if args.size == "tiny" else 2048
    peaks = {"bf16": matmul_peak(torch.bfloat16, size), "fp32": matmul_peak(torch.float32, size)}
    start = time.perf_counter()
    if args.only in (None, "clip"):
        bench_clip(report, cfg, reps)
    if args.only in (None, "fused"):
        bench_fused(report, cfg, reps, peaks)
    after = {"bf16": matmul_peak(torch.bfloat16, size), "fp32": matmul_peak(torch.float32, size)}
    report.detail("matmul_peak_gflops", {"before": peaks, "after": after})
    report.detail("bench_seconds", round(time.perf_counter() - start, 1))
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
