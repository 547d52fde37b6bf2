"""User-facing errors: the CLI prints them as one line on stderr and exits with code 2."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["UserError", "ConfigError", "one_line", "some"]


class UserError(Exception):
    """Bad input from the user (file, key or value). Shown as one line, exit code 2."""


class ConfigError(UserError, KeyError):
    """An unknown key, wrong type or impossible value in a config."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (multi-line library errors included); its type when it has none."""
    return " ".join(str(error).split()) or type(error).__name__


def some(names: Iterable[str], limit: int = 6) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are: a list an error line can hold."""
    names = list(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
