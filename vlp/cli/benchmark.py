"""``vlp benchmark SUITE.yaml --checkpoint DIR [--checkpoint DIR ...]``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_benchmark_command"]


def cmd_benchmark(args: argparse.Namespace) -> int:
    from vlp.benchmark.suite import load_suite
    from vlp.cli.arguments import checkpoint_dir, existing_path

    suite = load_suite(existing_path(args.suite, "file", "SUITE"), args.set)  # suite errors before any model loads
    checkpoints = [checkpoint_dir(value) for value in args.checkpoint]
    from vlp.benchmark.runner import run_suite

    output = Path(args.output) if args.output else Path("runs") / "benchmark" / suite.name
    only = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    run = run_suite(suite, checkpoints, output, device=args.device, progress=not args.no_progress,
                    debug=args.debug, only=only)
    for path in run.files.values():
        print(path)
    return 2 if run.failed else 0


def add_benchmark_command(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("benchmark", help="run a benchmark suite (retrieval, zero-shot, linear probe, "
                                         "compositionality) over checkpoints into one table")
    p.add_argument("suite", metavar="SUITE", help="the suite's YAML file (shipped: configs/benchmarks/)")
    p.add_argument("--checkpoint", action="append", required=True, metavar="DIR",
                   help="a checkpoint directory, or a run directory (its final/); repeat for more columns (required)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set a suite key, e.g. --set tasks.flickr30k.data=PATH (repeatable; default: none)")
    p.add_argument("--output", default=None, metavar="DIR",
                   help="directory for results.json, results.md and results.png (default: runs/benchmark/<suite>)")
    p.add_argument("--tasks", default=None, metavar="NAME,NAME",
                   help="run only these tasks of the suite (default: all)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda when available (GPU LOCAL_RANK under torchrun), else cpu (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars (default: shown)")
    add_common(p)
    p.set_defaults(handler=cmd_benchmark)
