"""One small registry class; one registry per kind of pluggable part."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["Registry", "image_encoders", "text_encoders", "fusions", "losses", "datasets"]

T = TypeVar("T", bound=Callable[..., Any])


class Registry(Generic[T]):
    """Maps names to builders. Registering a name twice is an error; an unknown name lists the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(builder: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = builder
            return builder

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            known = ", ".join(sorted(self._entries))
            raise KeyError(f"unknown {self.kind} '{name}'{hint}; known: {known}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)


image_encoders: Registry[Callable[..., Any]] = Registry("image encoder")
text_encoders: Registry[Callable[..., Any]] = Registry("text encoder")
fusions: Registry[Callable[..., Any]] = Registry("fusion")
losses: Registry[Callable[..., Any]] = Registry("loss")
datasets: Registry[Callable[..., Any]] = Registry("dataset")
