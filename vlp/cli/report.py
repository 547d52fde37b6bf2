"""``vlp report RUN_DIR``: a static HTML page about a run (config, curves, retrieval, VQA, throughput)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["add_command", "cmd_report"]


def cmd_report(args: argparse.Namespace) -> int:
    from vlp.report import write_report

    print(write_report(args.run_dir))
    return 0


def add_command(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("report", help="write RUN_DIR/report.html (static, images embedded)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by vlp pretrain or vlp finetune")
    add_common(p)
    p.set_defaults(handler=cmd_report)
