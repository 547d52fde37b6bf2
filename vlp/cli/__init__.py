"""Command line interface."""

from vlp.cli.main import main

__all__ = ["main"]
