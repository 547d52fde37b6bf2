"""The CUDA path in one short run: samples/s and model FLOPs utilization of a base-size pretraining step,
the real `vlp pretrain` loop end to end, and (two or more GPUs) a 2-process NCCL run.

Prepared for a GPU machine lent for a few minutes (about 3-5 minutes of work; nothing downloads):

    python benchmarks/gpu_check.py                       # albef_4m (ViT-B/16 + 6+6 layers), batch 64
    python benchmarks/gpu_check.py --seconds 30 --config configs/pretrain/clip_cc3m.yaml --batch-size 128

1. ``environment``: torch/CUDA versions, the device, bf16 support, which SDPA kernels are enabled.
2. ``step``: the config's model and objective (ITC + ITM with hard negatives + MLM, momentum encoder and
   queue as the config says) trained on random GPU tensors with bf16 autocast, fused AdamW and TF32 --
   the loop's CUDA settings -- for ``--seconds`` after warm-up steps: samples/s, seconds per step, peak
   memory. FLOPs per step are counted once with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
   attention, convolutions of forward + backward, the momentum encoder's forward included); MFU = counted
   FLOP/s over the device's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s, A100: 312; ``--peak-tflops``).
   ``--compile`` repeats it with ``train.compile`` (every transformer block compiled).
3. ``loop``: ``vlp pretrain`` on the built-in synthetic data (rendered by data workers, so the input
   pipeline counts) for ``--loop-steps`` steps; samples/s of its last logged window.
4. ``ddp`` (only with >= 2 GPUs): ``torchrun --nproc_per_node 2`` of the tiny demo config on NCCL with the
   final sharded retrieval evaluation; exit code and final loss.

Writes benchmarks/results/gpu_check.json and prints one line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "A10G": 70.0, "L4": 121.0}


def environment() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "device": props.name,
            "devices": torch.cuda.device_count(), "memory_gib": round(props.total_memory / 2**30, 1),
            "bf16": torch.cuda.is_bf16_supported(),
            "sdpa": {"flash": torch.backends.cuda.flash_sdp_enabled(),
                     "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                     "math": torch.backends.cuda.math_sdp_enabled()}}


def peak_tflops(name: str, override: float) -> float:
    if override > 0:
        return override
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), 0.0)


def _synthetic_batch(model: Any, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    size, length = model.image_encoder.image_size, model.config.text.max_length
    ids = torch.randint(5, model.text_encoder.vocab_size, (batch_size, length), device=device)
    ids[:, 0] = model.tokenizer.cls_id
    return {"images": torch.randn(batch_size, 3, size, size, device=device), "input_ids": ids,
            "attention_mask": torch.ones(batch_size, length, dtype=torch.bool, device=device),
            "image_ids": torch.arange(batch_size, device=device)}


def step_throughput(config_path: str, batch_size: int, seconds: float, compile_blocks: bool,
                    peak: float, device: torch.device) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    from vlp.config import load_config
    from vlp.models import build_model
    from vlp.objectives import PretrainObjective
    from vlp.train.distributed import compile_blocks as compile_all
    from vlp.train.loop import autocast_factory
    from vlp.train.optim import build_optimizer

    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    config = load_config(config_path)
    torch.manual_seed(0)
    model = build_model(config.model).to(device).train()
    objective = PretrainObjective(model, config.objective, autocast=autocast_factory("bf16", device)).to(device)
    if compile_blocks:
        compile_all(objective)
    optimizer = build_optimizer(model, config.optim, config.optim.lr, device.type)
    batch = _synthetic_batch(model, batch_size, device)

    def step() -> None:
        objective.training_step(batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.after_optimizer_step()

    for _ in range(3 if not compile_blocks else 6):  # warm-up (and compilation)
        step()
    counter = FlopCounterMode(display=False)
    with counter:
        objective.training_step(batch)
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
        if steps % 5 == 0:  # bounded queue of launched work; the clock check stays honest
            sync()
    sync()
    elapsed = time.perf_counter() - start
    achieved = flops * steps / elapsed / 1e12
    return {"config": config_path, "batch_size": batch_size, "compiled": compile_blocks, "steps": steps,
            "seconds_per_step": elapsed / steps, "samples_per_s": batch_size * steps / elapsed,
            "tflops_per_step": flops / 1e12, "achieved_tflops": achieved,
            "peak_bf16_tflops": peak, "mfu": achieved / peak if peak else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def _run(command: list[str], timeout: float) -> tuple[int, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "4"}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "timed out"
    return done.returncode, (done.stdout + done.stderr)[-2000:]


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def loop_throughput(config_path: str, batch_size: int, steps: int, workers: int, device: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        overrides = ["data.source=synthetic", f"data.synthetic_train_size={batch_size * (steps + 5)}",
                     f"data.batch_size={batch_size}", f"data.num_workers={workers}",
                     f"train.max_steps={steps}", "train.checkpoint_every=0", "train.log_every=10",
                     "train.progress=false", "train.precision=bf16", f"train.device={device}", "eval.every=-1"]
        code, tail = _run([sys.executable, "-m", "vlp.cli.main", "pretrain", config_path, "--output-dir",
                           f"{tmp}/run"] + [a for o in overrides for a in ("--set", o)], timeout=600)
        logged = [r for r in _records(Path(tmp) / "run") if "samples_per_s" in r]
    return {"exit_code": code, "steps": steps, "batch_size": batch_size, "num_workers": workers,
            "samples_per_s_last_window": logged[-1]["samples_per_s"] if logged else None,
            "log_tail": tail if code else ""}


def ddp_check() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        code, tail = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "vlp.cli.main", "pretrain", "configs/pretrain/demo_tiny.yaml", "--output-dir",
                           f"{tmp}/run", "--set", "train.device=cuda", "--set", "train.max_steps=20",
                           "--set", "eval.every=0"], timeout=300)
        records = _records(Path(tmp) / "run")
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    return {"exit_code": code, "steps": len(losses), "final_loss": losses[-1] if losses else None,
            "final_eval": evals[-1] if evals else None, "log_tail": tail if code else ""}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/pretrain/albef_4m.yaml")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0, help="timed seconds of the step benchmark")
    parser.add_argument("--compile", action="store_true", help="also time the step with compiled blocks")
    parser.add_argument("--loop-steps", type=int, default=40, help="steps of the end-to-end vlp pretrain (0: skip)")
    parser.add_argument("--workers", type=int, default=8, help="data workers of the end-to-end run")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak (0: from the device name)")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    parser.add_argument("--cpu-smoke", action="store_true", help="run the steps on the CPU (a test of the script)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"environment": environment() if device.type == "cuda" else {"device": "cpu"}}
    print(f"device: {report['environment']['device']}, torch {torch.__version__}")
    peak = peak_tflops(report["environment"]["device"], args.peak_tflops)
    variants = [False, True] if args.compile else [False]
    report["step"] = [step_throughput(args.config, args.batch_size, args.seconds, c, peak, device)
                      for c in variants]
    for result in report["step"]:
        mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a (unknown peak)"
        print(f"step{' (compiled)' if result['compiled'] else ''}: {result['samples_per_s']:.1f} samples/s, "
              f"{result['seconds_per_step'] * 1000:.0f} ms/step, {result['achieved_tflops']:.1f} TFLOP/s, MFU {mfu}, "
              f"peak memory {result['peak_memory_gib']} GiB")
    if args.loop_steps > 0:
        report["loop"] = loop_throughput(args.config, args.batch_size, args.loop_steps, args.workers, device.type)
        print(f"vlp pretrain loop: exit {report['loop']['exit_code']}, "
              f"{report['loop']['samples_per_s_last_window']} samples/s (input pipeline included)")
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        report["ddp"] = ddp_check()
        print(f"2-process NCCL pretrain + sharded eval: exit {report['ddp']['exit_code']}, "
              f"final loss {report['ddp']['final_loss']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
