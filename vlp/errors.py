"""User-facing errors: the CLI prints them as one line on stderr and exits with code 2."""

from __future__ import annotations

__all__ = ["UserError", "ConfigError"]


class UserError(Exception):
    """Bad input from the user (file, key or value). Shown as one line, exit code 2."""


class ConfigError(UserError, KeyError):
    """An unknown key, wrong type or impossible value in a config."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
