"""``vlp explain`` and ``vlp report``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["add_extra_commands"]


def add_extra_commands(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Registered once their modules exist (see vlp/cli/report.py and vlp/cli/explain.py)."""
    import importlib
    import importlib.util

    for name in ("report", "explain", "convert", "merge"):
        if importlib.util.find_spec(f"vlp.cli.{name}") is not None:
            module = importlib.import_module(f"vlp.cli.{name}")
            module.add_command(sub, add_common)
