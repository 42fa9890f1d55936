"""What a backend declares, as Polygraphy's runners declare their argument groups: its options
(a frozen dataclass whose fields carry their help), its capabilities (artifact/capabilities.py)
and its loader. A runner file defines these and ``runtime/registry.py`` registers them; the
command line builds its flags from the options (cli/backend_options.py), so nothing else names
the backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from samout_edge.artifact.arch import ArchSpec
from samout_edge.artifact.capabilities import Capabilities
from samout_edge.runtime.base import Runner

T = TypeVar("T", bound="BackendOptions")


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, cli: bool = True) -> Any:
    """A backend option: its default, its ``--help`` line, its choices; ``cli=False``: set by
    commands and library callers, never a flag (ONNX Runtime's arena, torch's checkpoint copy)."""
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli})


def default_of(f: Field) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


@dataclass(frozen=True)
class BackendOptions:
    """The options a backend reads. The methods are where a command's workload meets the
    backend's own knobs; the defaults leave the options as given."""

    def for_bench(self: T) -> list[T]:
        """The runs bench makes on this backend (ONNX Runtime: one per provider)."""
        return [self]

    def for_eval(self: T, stream: bool, grows: bool) -> tuple[T, int]:
        """eval's options and how many scoring calls it may make at once: windows are independent
        calls (``stream`` False); ``grows``: the state grows with every piece (a softmax stream)."""
        return self, 1

    def for_peak_memory(self: T) -> T:
        """The options under which freed memory goes back to the OS, so a peak RSS sees it."""
        return self


@dataclass(frozen=True)
class Backend:
    name: str
    options: type[BackendOptions]  # the frozen dataclass of what it reads
    load: Callable[[Path, Any], Runner]  # (export or engine directory, its options) -> runner
    summary: str
    capabilities: Capabilities
    # (checkpoint, its options, arch, heads, logits) -> runner; None: it runs exports only
    load_checkpoint: Callable[[Path, Any, ArchSpec, int | None, str], Runner] | None = None

    @property
    def activations(self) -> tuple[str, ...]:
        return self.capabilities.activations

    def cli_fields(self) -> list[Field]:
        return [f for f in fields(self.options) if f.metadata.get("cli", True)]

    def options_from(self, settings: Any) -> BackendOptions:
        """This backend's options out of a command's ``Settings`` (the fields it declares), or
        its options as they are."""
        if isinstance(settings, self.options):
            return settings
        if hasattr(settings, "given"):
            given = settings.given()
        else:  # another backend's options: the fields the two share
            given = {f.name: getattr(settings, f.name) for f in fields(settings)} if settings is not None else {}
        return self.options(**{f.name: given[f.name] for f in fields(self.options) if f.name in given})
