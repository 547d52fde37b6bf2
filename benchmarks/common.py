"""Shared helpers of the benchmarks: side-by-side timing, in-run matmul peaks, machine facts, JSON reports.

Every figure is a ratio of vlp against a reference measured in the same process, with repetitions of the
two interleaved (the order alternates each round) and medians taken, so load from other processes hits
both sides alike. ``tune_allocator()`` (glibc keeps freed blocks) is applied once per process, before
anything is timed, so it holds for vlp and the reference alike; ``--no-tune-allocator`` turns it off for
both. Results go to ``benchmarks/results/<name>.json`` with the machine (including vlp's AMX answer,
``vlp.precision.amx_available``), the fp32 and bf16 matmul peaks measured at the start of the run, the load
averages before and after, and one summary line per figure on stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RESULTS_DIR", "Report", "base_parser", "setup", "interleaved", "median", "paired_ratio", "matmul_peak",
    "run_matmul_peaks", "load_average", "machine_info", "sizes_for",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SIZES = ("tiny", "quick", "full")


def base_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every benchmark takes: size preset, repetitions, threads, allocator, output directory."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", choices=SIZES, default="quick",
                        help="tiny: smoke test; quick: `make bench`; full: the sizes the targets name")
    parser.add_argument("--full", action="store_const", const="full", dest="size", help="same as --size full")
    parser.add_argument("--reps", type=int, default=0, help="timed repetitions per side (0: the size's default)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--no-tune-allocator", action="store_true",
                        help="leave glibc's malloc thresholds alone (for both sides)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory of the JSON result")
    return parser


def sizes_for(size: str, table: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The size preset's settings from a benchmark's table ``{"tiny": {...}, "quick": {...}, "full": {...}}``."""
    return dict(table[size])


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Apply the process-wide settings (threads, allocator) and return them for the report."""
    from vlp.runtime import tune_allocator

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tuned = False if args.no_tune_allocator else tune_allocator()
    torch.manual_seed(0)
    return {"threads": torch.get_num_threads(), "allocator_tuned_both_sides": tuned}


def load_average() -> list[float]:
    """The 1/5/15-minute load averages (other processes competing for the cores)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
                return [flag for flag in line.split(":", 1)[1].split() if flag in wanted]
    except OSError:
        pass
    return []


def _amx_info() -> dict[str, Any]:
    """vlp's AMX answer (what reports and the tests' forced branches use), the bare detection, the override."""
    from vlp.precision import ASSUME_AMX_ENV, amx_available, detect_amx

    return {"vlp_amx_available": amx_available(), "detected": detect_amx(),
            ASSUME_AMX_ENV: os.environ.get(ASSUME_AMX_ENV)}


def machine_info() -> dict[str, Any]:
    return {
        "cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "cpu_flags": _cpu_flags(), "amx": _amx_info(),
        "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(), "cuda": torch.cuda.is_available(),
    }


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def interleaved(candidates: Mapping[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall-clock seconds of each candidate, ``reps`` times, in alternating order (ab, ba, ab, ...).

    ``warmup`` untimed rounds run first (allocator, oneDNN primitive caches). Garbage is collected
    outside the timed region.
    """
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + reps):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            gc.collect()
            start = time.perf_counter()
            candidates[name]()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of the per-round ratios: each pair ran back to back, so slow drifts in load cancel."""
    return median([a / b for a, b in zip(numerator, denominator)])


def matmul_peak(dtype: torch.dtype, size: int = 2048, reps: int = 5) -> float:
    """Best GFLOP/s of a square ``size`` matmul in ``dtype`` (the in-run peak that utilizations divide by)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)
    best = 0.0
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


PEAK_SIZES = {"tiny": 256, "quick": 2048, "full": 2048}
PEAK_BUDGET_S = 0.5


def run_matmul_peaks(max_size: int, budget_s: float = PEAK_BUDGET_S, reps: int = 3) -> dict[str, Any]:
    """fp32 and bf16 CPU matmul peaks of this run ({dtype: {"gflops", "size"}}, and bf16 / fp32).

    Each dtype's square size doubles from 256 up to ``max_size`` while one product is predicted (8x the
    last one) to stay under ``budget_s``: on CPUs without bf16 matmul instructions a 2048 bf16 product takes
    tens of seconds, and a smaller one measures the same rate.
    """
    peaks: dict[str, Any] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        size = min(256, max_size)
        while size * 2 <= max_size:
            a = torch.randn(size, size).to(dtype)
            start = time.perf_counter()
            torch.mm(a, a)
            if 8 * (time.perf_counter() - start) > budget_s:
                break
            size *= 2
        peaks[name] = {"gflops": round(matmul_peak(dtype, size, reps), 1), "size": size}
    peaks["bf16_over_fp32"] = round(peaks["bf16"]["gflops"] / max(peaks["fp32"]["gflops"], 1e-9), 3)
    return peaks


class Report:
    """Figures of one benchmark run: printed as one line each and written to ``<out>/<name>.json``."""

    def __init__(self, name: str, args: argparse.Namespace, settings: dict[str, Any]) -> None:
        self.name = name
        self.out_dir: Path = args.out
        self.started = time.time()
        self.data: dict[str, Any] = {
            "benchmark": name, "size": args.size, "machine": machine_info(), "settings": settings,
            "load_average_before": load_average(), "figures": {}, "details": {},
        }
        self.data["matmul_peaks"] = run_matmul_peaks(PEAK_SIZES.get(args.size, 2048))
        peaks = self.data["matmul_peaks"]
        print(f"[{name}] amx (vlp): {self.data['machine']['amx']['vlp_amx_available']}; matmul peaks "
              f"fp32 {peaks['fp32']['gflops']:.4g}, bf16 {peaks['bf16']['gflops']:.4g} GFLOP/s", flush=True)

    def figure(self, key: str, value: float, unit: str, target: float | None = None, higher_is_better: bool = True,
               note: str = "") -> bool | None:
        """Record and print one figure; with a target, whether it is met."""
        passed = None if target is None else (value >= target if higher_is_better else value <= target)
        self.data["figures"][key] = {"value": value, "unit": unit, "target": target,
                                     "target_is": None if target is None else (">=" if higher_is_better else "<="),
                                     "met": passed, "note": note}
        goal = "" if target is None else f"  (target {'>=' if higher_is_better else '<='} {target:g}: " \
                                         f"{'met' if passed else 'MISSED'})"
        print(f"[{self.name}] {key}: {value:.4g} {unit}{goal}{'  -- ' + note if note else ''}", flush=True)
        return passed

    def detail(self, key: str, value: Any) -> None:
        self.data["details"][key] = value

    def write(self) -> Path:
        self.data["load_average_after"] = load_average()
        self.data["wall_seconds"] = round(time.time() - self.started, 1)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{self.name}.json"
        path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        print(f"[{self.name}] wrote {path} ({self.data['wall_seconds']} s, load "
              f"{self.data['load_average_before']} -> {self.data['load_average_after']})", flush=True)
        return path
