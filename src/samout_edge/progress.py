"""How library calls report progress without knowing about Rich."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, description: str, completed: int, total: int) -> None: ...


def no_progress(description: str, completed: int, total: int) -> None:
    """The default: library calls stay silent unless the caller wants updates."""
