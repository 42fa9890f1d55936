"""Every backend's options as command-line flags, built from the registry, as Polygraphy builds
its flags from per-runner argument groups.

A command that picks a backend declares ``backend: str`` and ``settings: Settings`` and is
decorated with ``@backend_options()`` under ``@app.command()``. The wrapper replaces the two
parameters with ``--backend`` (the registry's names) and one flag per field of every
registered backend's options dataclass: its type, default, help and choices come from the
field (runtime/backend.py ``option``), so a backend's flag is written once, in its runner
file. The command is called with the backend's name and one ``Settings``. ``refresh`` builds
the signatures again (``cli.app.main`` calls it before each run), so a backend registered
after import has its flags too.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import Field, dataclass, field
from enum import Enum
from typing import Any, Optional

import typer

from samout_edge.runtime.backend import default_of
from samout_edge.runtime.registry import BACKENDS, Settings, option_fields
from samout_edge.runtime.target import backends_for

_COMMANDS: list[Callable[..., Any]] = []
_SETTINGS, _BACKEND = "settings", "backend"


@dataclass(frozen=True)
class Flags:
    """How one command takes the backend options: ``choose`` one backend (``--backend NAME``, or
    auto), ``many`` (a comma-separated list: bench), or none; per-command defaults and help."""

    choose: str = "one"
    backend_default: str = "auto"
    defaults: dict[str, Any] = field(default_factory=dict)
    helps: dict[str, str] = field(default_factory=dict)


def backend_options(choose: str = "one", backend_default: str | None = None, defaults: dict[str, Any] | None = None,
                    helps: dict[str, str] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    flags = Flags(choose, backend_default or ("auto" if choose == "one" else "torch,ort"), defaults or {}, helps or {})

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        declared = inspect.signature(fn, eval_str=True)
        if _SETTINGS not in declared.parameters or (choose != "none" and _BACKEND not in declared.parameters):
            raise TypeError(f"{fn.__name__}: @backend_options needs a 'settings' (and 'backend') parameter")

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            names = command.option_names  # type: ignore[attr-defined]
            values = {name: _plain(kwargs.pop(name)) for name in names if name in kwargs}
            if _BACKEND in kwargs:
                kwargs[_BACKEND] = _plain(kwargs[_BACKEND])
            return fn(**kwargs, settings=Settings(**values))

        command.declared, command.flags = declared, flags  # type: ignore[attr-defined]
        _build(command)
        _COMMANDS.append(command)
        return command

    return wrap


def refresh() -> None:
    """Build every decorated command's parameters again from the registry as it is now."""
    for command in _COMMANDS:
        _build(command)


def backend_help() -> str:
    kinds = {"an export": "export", "an engine": "engine", "a checkpoint": "checkpoint"}
    auto = "; ".join(f"{what}: {names[0]}" for what, kind in kinds.items() if (names := backends_for(kind)))
    return f"auto ({auto}), or a registered backend: {', '.join(BACKENDS)}."


def _build(command: Any) -> None:
    declared: inspect.Signature = command.declared
    flags: Flags = command.flags
    params, names = [], []
    for p in declared.parameters.values():
        if p.name == _SETTINGS:
            generated = _option_params(flags, set(declared.parameters))
            params += generated
            names += [g.name for g in generated]
        elif p.name == _BACKEND and flags.choose != "none":
            params.append(_backend_param(flags))
        else:
            params.append(p)
    command.__signature__ = declared.replace(parameters=params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.option_names = names


def _backend_param(flags: Flags) -> inspect.Parameter:
    if flags.choose == "many":
        listed = "; ".join(f"{b.name}: {b.summary}" for b in BACKENDS.values())
        return _param(_BACKEND, str, typer.Option(flags.backend_default, help=f"Backends, comma-separated: {listed}."))
    names = Enum("Backend", {v: v for v in ("auto", *BACKENDS)}, type=str)  # type: ignore[misc]
    return _param(_BACKEND, names, typer.Option(flags.backend_default, help=backend_help()))


def _option_params(flags: Flags, taken: set[str]) -> list[inspect.Parameter]:
    out = []
    for name, f in option_fields().items():
        if not f.metadata.get("cli", True):
            continue
        if name in taken:
            raise ValueError(f"backend option {name!r} is also a parameter of the command: rename the option")
        owners = [b.name for b in BACKENDS.values() if name in b.options.__dataclass_fields__]
        default = flags.defaults.get(name, default_of(f))
        text = flags.helps.get(name) or (f"{f.metadata.get('help', '').rstrip('.')} (the {' and '.join(owners)} "
                                         f"backend{'s' if len(owners) > 1 else ''}).")
        annotation, decls = _flag_type(name, f, owners[0], default)
        out.append(_param(name, annotation, typer.Option(default, *decls, help=text)))
    return out


def _flag_type(name: str, f: Field, owner: str, default: Any) -> tuple[Any, tuple[str, ...]]:
    """The annotation Typer parses a field as, and its flag names (``--fast-kernel/--no-fast-kernel``)."""
    flag = "--" + name.replace("_", "-")
    hint = typing.get_type_hints(BACKENDS[owner].options)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if f.metadata.get("choices"):
        values = {v: v for v in f.metadata["choices"]}
        choices = Enum(name.title().replace("_", ""), values, type=str)  # type: ignore[misc]
        return (Optional[choices] if default is None else choices), (flag,)
    if args == [bool]:
        return (Optional[bool] if default is None else bool), (f"{flag}/--no-{flag[2:]}",)
    if len(args) == 1 and args[0] in (str, int, float):
        return Optional[args[0]], (flag,)
    raise ValueError(f"backend option {name!r} ({hint}) has no flag type: make it str, int, float or bool, "
                     "or declare it cli=False")


def _param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation)


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value
