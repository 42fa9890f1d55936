"""Backends registered by name: the only list of them, and where a name becomes a runner.

Each backend is declared in its runner file (runtime/backend.py: its options dataclass, its
capabilities, its loader) and registered here with one ``register`` call. A command hands
``load_runner`` one ``Settings`` (what its command line was given); the backend takes the
fields its options declare. The CLI's ``--backend`` choices and every backend flag are built
from this registry (cli/backend_options.py), and what an export needs is checked against the
backend's capabilities here, once, for every command.
"""

from __future__ import annotations

from dataclasses import Field, fields
from pathlib import Path
from typing import Any

from samout_edge.artifact.capabilities import refusal
from samout_edge.errors import SamoutError
from samout_edge.runtime import (
    native_runner,
    openvino_runner,
    ort_runner,
    reference_runner,
    tensorrt_runner,
    torch_runner,
)
from samout_edge.runtime.backend import Backend, BackendOptions, default_of
from samout_edge.runtime.base import Runner

BACKENDS: dict[str, Backend] = {}
RUNNERS = BACKENDS  # the registry under its earlier name


def register(backend: Backend) -> Backend:
    """Add ``backend``; an option another backend declares too must be the same option (one flag)."""
    if backend.name in BACKENDS or backend.name == "auto":
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    declared = option_fields()
    for f in fields(backend.options):
        other = declared.get(f.name)
        if other is not None and (str(other.type), default_of(other), dict(other.metadata).get("choices")) != \
                (str(f.type), default_of(f), dict(f.metadata).get("choices")):
            raise ValueError(f"backend {backend.name!r}: option {f.name!r} is declared by another backend with "
                             "another type, default or choices; one flag cannot be both")
    BACKENDS[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    BACKENDS.pop(name, None)


def option_fields() -> dict[str, Field]:
    """Every registered backend's options by field name (a name two backends share is one option)."""
    found: dict[str, Field] = {}
    for backend in BACKENDS.values():
        for f in fields(backend.options):
            found.setdefault(f.name, f)
    return found


class Settings:
    """What a command was given for every backend: keywords, each a field that some registered
    backend's options declare (an unknown one is a TypeError, as a dataclass's). Each backend takes
    its own (``Backend.options_from``); an attribute is the value given, else its declared default."""

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - set(option_fields()))
        if unknown:
            raise TypeError(f"Settings() got unknown backend option(s): {', '.join(unknown)} "
                            f"(declared: {', '.join(option_fields())})")
        self._values = dict(values)

    def given(self) -> dict[str, Any]:
        return dict(self._values)

    def replace(self, **changes: Any) -> Settings:
        return Settings(**{**self._values, **changes})

    def to_dict(self) -> dict[str, Any]:
        """The values given, JSON-ready (a bench child process rebuilds them)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in self._values.items()}

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("_values")
        if values is None or name.startswith("_"):
            raise AttributeError(name)
        if name in values:
            return values[name]
        declared = option_fields().get(name)
        if declared is None:
            raise AttributeError(f"no registered backend declares the option {name!r}")
        return default_of(declared)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Settings) and self._values == other._values

    def __repr__(self) -> str:
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"


LoadOptions = Settings  # the name callers used before backends owned their options


def backend_named(name: str) -> Backend:
    found = BACKENDS.get(name)
    if found is None:
        raise SamoutError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return found


def load_runner(directory: str | Path, backend: str, settings: Settings | BackendOptions | None = None) -> Runner:
    """The export (or engine) in ``directory`` on ``backend``, given what a command was told."""
    found = backend_named(backend)
    check_export(Path(directory), found)
    check_installed(found)
    return found.load(Path(directory), found.options_from(settings or Settings()))


def check_installed(backend: Backend) -> None:
    for need in backend.capabilities.missing():
        raise SamoutError(f"the {backend.name} backend needs {need.what}, which this install does not have: "
                          f"{need.install}")


def check_export(directory: Path, backend: Backend) -> None:
    """What the export needs and the backend does not compute is refused in one line, before
    anything loads (int8 activations, model-local functions, zero-points, a dtype, a growing state)."""
    from samout_edge.artifact.engine import is_engine_dir
    from samout_edge.artifact.manifest import read_manifest

    if is_engine_dir(directory):
        directory = directory.parent.parent  # an engine: what its export needs
    if not (directory / "export.json").is_file():
        return  # not an export at all: the backend's own loader says what is wrong
    manifest = read_manifest(directory)
    lack = backend.capabilities.lacks(manifest)
    if lack is not None:
        able = [b.name for b in BACKENDS.values() if b.capabilities.lacks(manifest) is None]
        raise SamoutError(refusal(lack, manifest, backend.name, backend.capabilities, directory, able))


check_activations = check_export  # its earlier name (int8 activations were the first thing checked)

# The built-in backends, in the order `auto` and --help list them: one line each.
register(ort_runner.BACKEND)
register(tensorrt_runner.BACKEND)
register(torch_runner.BACKEND)
register(reference_runner.BACKEND)
register(openvino_runner.BACKEND)
register(native_runner.BACKEND)
