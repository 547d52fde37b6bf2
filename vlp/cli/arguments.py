"""Argument helpers every subcommand shares: paths checked before anything heavy loads, --overwrite."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from vlp.errors import UserError

__all__ = ["existing_path", "checkpoint_dir", "add_overwrite"]


# "path": a file or a directory (--data may name a Hugging Face dataset directory)
_PATH_CHECKS: dict[str, Callable[[Path], bool]] = {"file": Path.is_file, "directory": Path.is_dir,
                                                   "path": Path.exists}


def existing_path(value: str, kind: Literal["file", "directory", "path"], flag: str = "") -> Path:
    """A path from the command line, checked before anything heavy is imported or loaded; else one UserError
    line ``[FLAG: ][KIND ]not found: VALUE`` (a "path" is not named by its kind)."""
    path = Path(value)
    if not _PATH_CHECKS[kind](path):
        where, what = f"{flag}: " if flag else "", "" if kind == "path" else f"{kind} "
        raise UserError(f"{where}{what}not found: {value}")
    return path


def checkpoint_dir(value: str, flag: str = "--checkpoint") -> Path:
    """A checkpoint directory, or a run directory's ``final/``; else one UserError line."""
    from vlp.models.persist import resolve_checkpoint_dir

    path = existing_path(value, "directory", flag)
    try:
        return resolve_checkpoint_dir(path)
    except UserError as err:
        raise UserError(f"{flag}: {err}") from None


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    """--overwrite of every command that writes a run directory (without it, one that holds a run is refused)."""
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run in the run directory (metrics, checkpoints, final/, plots, evaluation "
                             "files) and start over; without it or --resume a directory that holds a run is "
                             "refused (default: off)")
