"""Peak activation memory and step time of one pretraining step: activation checkpointing and the
gradient cache (``train.contrastive_chunk_size``).

Figures (targets from issue 10):
- ``checkpointing_activation_reduction``: peak activation memory of a base-size ALBEF step (ViT-B/16,
  6 + 6 BERT-base-width text/fusion layers, ITC + ITM + MLM) without / with ``set_grad_checkpointing``;
  target >= 2. Also its time cost.
- ``chunked_512_vs_unchunked_32_peak``: a small model (ViT-S/16-like image tower, 6-layer text, 3 fusion
  layers, ITC + ITM with hard negatives) on a batch of 512 in chunks of 32, against an unchunked batch of
  32; target <= 1.5. Also the time per sample of the chunked step against the unchunked batch of 32,
  and (quick size) the peak of the unchunked batch of 512 that chunking avoids.

How memory is measured. CPU: ``torch.profiler`` with ``profile_memory=True`` records every tensor
allocation and free of the CPU allocator during the step; the figure is the peak of the running sum,
i.e. the most tensor bytes the step held at once beyond what existed before it (parameters, the batch,
and the gradients, which are allocated before the step so that they do not count as activations).
Memory outside the tensor allocator (Python objects, library scratch space) is not counted. Each
configuration runs in a fresh subprocess; for the four configurations the targets compare, a first step
runs without the profiler and the growth of the process's peak RSS (``ru_maxrss``) over it is recorded as
a cross-check (it also holds heap fragmentation and non-tensor memory); the other configurations warm
up on 32 rows instead. CUDA (``--device cuda``):
``torch.cuda.max_memory_allocated`` minus the allocated bytes before the step.
Times are seconds of process CPU time on CPU (what this process computed: waiting for a core that
other processes hold does not count, so use ``--threads 1``, where no thread spins waiting for another)
and of wall-clock time on CUDA: the fastest of ``--reps`` further steps (at least 3 for batches of at
most 32 rows, which take seconds), or with ``--reps 0`` (the quick default, to stay within a few
minutes) the measured step itself, profiler included, after the first (RSS or warm-up) step. Wall-clock times are in the JSON too, with the load averages.

    python benchmarks/bench_memory.py [--size tiny|quick|full] [--smoke] [--in-process] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import Report, base_parser, setup, sizes_for

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "at", "the", "top", "bottom", "left",
         "right", "of", "small", "large", "two", "shapes", "and", "center"]

WARMUP_ROWS = 32
# quick: the whole script in a few minutes on 2 CPU cores (image size reduced: the models keep their
# widths and depths); full: the sizes the targets name.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"base_image": 32, "base_batch": 4, "small_image": 32, "small_batch": 32, "chunk": 8,
             "unchunked_big": True, "reps": 0, "tiny_models": True},
    "quick": {"base_image": 128, "base_batch": 4, "small_image": 64, "small_batch": 512, "chunk": 32,
              "unchunked_big": True, "reps": 0, "tiny_models": False},
    "full": {"base_image": 224, "base_batch": 16, "small_image": 224, "small_batch": 512, "chunk": 32,
             "unchunked_big": False, "reps": 2, "tiny_models": False},
}


def _model_dicts(cfg: dict[str, Any], base_tokenizer: str = "synthetic") -> dict[str, dict[str, Any]]:
    import yaml

    base: dict[str, Any] = yaml.safe_load((ROOT / "configs" / "models" / "albef_base.yaml").read_text())["model"]
    base["image"]["image_size"] = cfg["base_image"]
    base["text"]["tokenizer"] = base_tokenizer
    small: dict[str, Any] = {
        "name": "small",
        "image": {"type": "vit", "image_size": cfg["small_image"], "patch_size": 16, "width": 384, "depth": 12,
                  "num_heads": 6},
        "text": {"type": "transformer", "tokenizer": "synthetic", "width": 384, "depth": 6, "num_heads": 6,
                 "max_length": 30},
        "fusion": {"type": "dual_stream", "depth": 3, "num_heads": 6, "update_image": False},
        "embed_dim": 256, "itm_head": True, "mlm_head": False,
    }
    if cfg["tiny_models"]:  # the smoke test: same structure, widths 32
        for model in (base, small):
            model["image"].update(width=32, depth=2, num_heads=2, patch_size=8)
            model["text"].update(width=32, depth=2, num_heads=2, tokenizer="synthetic")
            model["fusion"].update(depth=1, num_heads=2)
            model["embed_dim"] = 16
    return {"base": base, "small": small}


def _cases(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> model, batch, checkpointing, chunk size, objective weights."""
    small, big, chunk = "small", cfg["small_batch"], cfg["chunk"]
    albef = {"itm_weight": 1.0, "mlm_weight": 1.0}
    contrastive_itm = {"itm_weight": 1.0, "mlm_weight": 0.0}
    cases = {
        "base_plain": {"model": "base", "batch": cfg["base_batch"], "ckpt": False, "chunk": 0, "objective": albef,
                       "rss": True},
        "base_checkpointed": {"model": "base", "batch": cfg["base_batch"], "ckpt": True, "chunk": 0,
                              "objective": albef, "rss": True},
        f"small_batch{chunk}": {"model": small, "batch": chunk, "ckpt": False, "chunk": 0,
                                "objective": contrastive_itm, "rss": True},
        f"small_batch{big}_chunk{chunk}": {"model": small, "batch": big, "ckpt": False, "chunk": chunk,
                                           "objective": contrastive_itm, "rss": True},
        # the extra figures: one (profiled) step each, after a warm-up on 32 rows
        f"small_batch{big}_chunk{chunk}_checkpointed": {"model": small, "batch": big, "ckpt": True, "chunk": chunk,
                                                        "objective": contrastive_itm, "rss": False},
    }
    if cfg["unchunked_big"]:
        cases[f"small_batch{big}"] = {"model": small, "batch": big, "ckpt": False, "chunk": 0,
                                      "objective": contrastive_itm, "rss": False}
    return cases


def _batch(model: Any, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    captions = [" ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(4 + i % 9)) for i in range(size)]
    tokens = model.tokenizer(captions, max_length=model.config.text.max_length)
    image = model.image_encoder.image_size
    return {"images": torch.randn(size, 3, image, image, generator=torch.Generator().manual_seed(0)).to(device),
            "input_ids": tokens["input_ids"].to(device), "attention_mask": tokens["attention_mask"].to(device),
            "image_ids": torch.arange(size, device=device)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_peak_bytes(step: Any) -> int:
    """Peak of the running sum of CPU allocator events during ``step()`` (bytes beyond the start)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def run_case(case: dict[str, Any], models: dict[str, dict[str, Any]], device: torch.device, reps: int) -> dict[str, Any]:
    """Build the model, run one measured step and ``reps`` timed steps; return the case's numbers."""
    from vlp.config import ObjectiveConfig
    from vlp.models import VLPModel
    from vlp.objectives import PretrainObjective

    torch.manual_seed(0)
    model = VLPModel.from_config(copy.deepcopy(models[case["model"]])).to(device).train()
    model.set_grad_checkpointing(case["ckpt"])
    objective = PretrainObjective(model, ObjectiveConfig(**case["objective"]), chunk_size=case["chunk"],
                                  generator=torch.Generator(device=device).manual_seed(0))
    batch = _batch(model, case["batch"], device)
    for param in model.parameters():  # gradients exist before the step: the peak counts activations
        param.grad = torch.zeros_like(param)
    losses: dict[str, float] = {}

    def step(rows: dict[str, torch.Tensor] = batch) -> None:
        out = objective.training_step(rows)
        losses.update({k: float(v) for k, v in out.terms.items()})
        for param in model.parameters():
            if param.grad is not None:
                param.grad.zero_()

    rss_growth = None
    if case["rss"] and device.type == "cpu":
        # a first step without the profiler (whose own buffers would count): the growth of the process's
        # peak RSS cross-checks the tensor peak measured next
        rss_before = _rss_bytes()
        step()
        rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    else:  # warm-up (untimed): process-level initialization and the kernels of one chunk-sized batch
        step({k: v[:min(case["batch"], WARMUP_ROWS)] for k, v in batch.items()})
    # CPU: process time, the work of this process (a shared core's waiting does not count; with several
    # threads it also counts their spinning on each other); CUDA: wall time after synchronizing
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    start, wall = clock(), time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - start_bytes
    else:
        peak = _cpu_peak_bytes(step)
    measured, measured_wall = clock() - start, time.perf_counter() - wall
    times, walls = [], []
    # a step of at most 32 rows takes seconds: time a few, as one on a shared machine is noisy
    for _ in range(reps if case["batch"] > WARMUP_ROWS else max(reps, 3)):
        start, wall = clock(), time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(clock() - start)
        walls.append(time.perf_counter() - wall)
    params = sum(p.numel() for p in model.parameters())
    return {**case, "params": params, "peak_activation_bytes": peak, "rss_peak_growth_bytes": rss_growth,
            "step_seconds": min(times) if times else measured, "step_clock": clock.__name__,
            "timed_steps": times, "timed_steps_wall": walls, "measured_step_seconds": measured,
            "measured_step_wall_seconds": measured_wall, "losses": losses}


def _run_in_subprocess(name: str, args: Any) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker-case", name, "--size", args.size, "--device", args.device,
               "--threads", str(args.threads), "--reps", str(args.reps), "--base-tokenizer", args.base_tokenizer]
    if args.no_tune_allocator:
        command.append("--no-tune-allocator")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _mib(value: float) -> float:
    return value / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_const", const="tiny", dest="size", help="same as --size tiny")
    parser.add_argument("--in-process", action="store_true", help="run every configuration in this process "
                        "(no fresh subprocess per configuration: no RSS cross-check; --smoke implies it)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--base-tokenizer", choices=("synthetic", "clip"), default="synthetic",
                        help="vocabulary of the base model: with clip's 49k BPE tokens the tied MLM embedding adds "
                             "parameter-sized gradient buffers that checkpointing cannot remove")
    parser.add_argument("--worker-case", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = sizes_for(args.size, SIZES)
    args.reps = args.reps or cfg["reps"]
    settings = setup(args)
    device = torch.device(args.device)
    models, cases = _model_dicts(cfg, args.base_tokenizer), _cases(cfg)
    if args.worker_case:
        print(json.dumps(run_case(cases[args.worker_case], models, device, args.reps)))
        return 0

    in_process = args.in_process or args.size == "tiny"
    report = Report("bench_memory", args, {**settings, **cfg, "device": args.device, "in_process": in_process,
                                           "base_tokenizer": args.base_tokenizer,
                                           "memory_method": "cuda max_memory_allocated" if device.type == "cuda"
                                           else "torch.profiler CPU allocator events (peak of running sum)"})
    results: dict[str, dict[str, Any]] = {}
    for name, case in cases.items():
        if in_process:
            result = run_case(case, models, device, args.reps)
            result["rss_peak_growth_bytes"] = None  # the process's lifetime peak says nothing about one case
        else:
            result = _run_in_subprocess(name, args)
        if not all(map(_finite, result["losses"].values())):
            print(f"non-finite loss in {name}: {result['losses']}", file=sys.stderr)
            return 1
        results[name] = result
        print(f"  {name}: peak {_mib(result['peak_activation_bytes']):.1f} MiB, step {result['step_seconds']:.2f} s",
              flush=True)
    report.detail("cases", results)

    plain, ckpt = results["base_plain"], results["base_checkpointed"]
    report.figure("checkpointing_activation_reduction",
                  plain["peak_activation_bytes"] / ckpt["peak_activation_bytes"], "x (peak without / with)", 2.0,
                  note=f"base model, batch {plain['batch']}, {cfg['base_image']} px: "
                       f"{_mib(plain['peak_activation_bytes']):.0f} -> {_mib(ckpt['peak_activation_bytes']):.0f} MiB")
    report.figure("checkpointing_time_cost", ckpt["step_seconds"] / plain["step_seconds"], "x step time",
                  note=f"{plain['step_seconds']:.2f} -> {ckpt['step_seconds']:.2f} s")
    chunk, big = cfg["chunk"], cfg["small_batch"]
    small, chunked = results[f"small_batch{chunk}"], results[f"small_batch{big}_chunk{chunk}"]
    both = results[f"small_batch{big}_chunk{chunk}_checkpointed"]
    report.figure(f"chunked_{big}_vs_unchunked_{chunk}_peak",
                  chunked["peak_activation_bytes"] / small["peak_activation_bytes"], "x peak memory", 1.5,
                  higher_is_better=False,
                  note=f"{_mib(small['peak_activation_bytes']):.0f} vs {_mib(chunked['peak_activation_bytes']):.0f} MiB, "
                       f"{cfg['small_image']} px")
    if chunked["rss_peak_growth_bytes"] and small["rss_peak_growth_bytes"]:
        report.figure(f"chunked_{big}_vs_unchunked_{chunk}_rss_growth",
                      chunked["rss_peak_growth_bytes"] / small["rss_peak_growth_bytes"], "x peak RSS growth",
                      note="cross-check of the tensor peaks, first step of each process without the profiler")
    per_sample = (chunked["step_seconds"] / big) / (small["step_seconds"] / chunk)
    report.figure("chunking_time_cost_per_sample", per_sample, f"x time per sample (batch {big} in chunks of "
                  f"{chunk} / batch {chunk})", note=f"{chunked['step_seconds']:.2f} s per step of {big} vs "
                  f"{small['step_seconds']:.2f} s per step of {chunk}")
    if f"small_batch{big}" in results:
        full = results[f"small_batch{big}"]
        report.figure(f"chunking_time_cost_vs_unchunked_{big}", chunked["step_seconds"] / full["step_seconds"],
                      f"x step time (batch {big} in chunks of {chunk} / at once)",
                      note=f"{chunked['step_seconds']:.2f} vs {full['step_seconds']:.2f} s")
    report.figure(f"chunked_checkpointed_{big}_vs_unchunked_{chunk}_peak",
                  both["peak_activation_bytes"] / small["peak_activation_bytes"], "x peak memory",
                  note=f"{_mib(both['peak_activation_bytes']):.0f} MiB, {both['step_seconds']:.2f} s per step")
    if f"small_batch{big}" in results:
        full = results[f"small_batch{big}"]
        report.figure(f"unchunked_{big}_vs_chunked_peak",
                      full["peak_activation_bytes"] / chunked["peak_activation_bytes"], "x peak memory saved",
                      note=f"{_mib(full['peak_activation_bytes']):.0f} MiB unchunked, {full['step_seconds']:.2f} s")
    report.write()
    return 0


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


if __name__ == "__main__":
    sys.exit(main())
