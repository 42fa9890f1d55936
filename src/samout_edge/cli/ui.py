"""Rich plumbing shared by the commands: consoles, progress, JSON, one-line errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from samout_edge.artifact.resources import human_bytes  # noqa: F401 - re-exported for the commands

# Piped output (CI logs, files) gets 150 columns instead of Rich's 80, so tables stay whole.
console = Console(width=None if sys.stdout.isatty() else 150)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator:
    """Yield a samout_edge.progress.Progress callback drawn as a Rich bar on stderr."""
    if not enabled or not err_console.is_terminal:
        yield lambda description, completed, total: None
        return
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("starting", total=None)

        def update(description: str, completed: int, total: int) -> None:
            bar.update(task, description=description, completed=completed, total=total)

        yield update


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")





def ok(passed: bool | None) -> str:
    return "[green]pass[/]" if passed else ("[red]FAIL[/]" if passed is not None else "-")
