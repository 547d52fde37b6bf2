"""Command line interface (``vlp``; also ``python -m vlp.cli.main``)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    # imported on call so that ``python -m vlp.cli.main`` does not import the module twice
    from vlp.cli.main import main as run

    return run(argv)
