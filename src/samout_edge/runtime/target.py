"""What a path names, and the runner that runs it: the one place every command asks.

A target is an export directory, an engine directory (``EXPORT/engines/PROFILE``,
or an export with ``--engine PROFILE``), or a checkpoint (a directory with
config.json + model.safetensors, or a state_dict file). ``auto`` runs each on the
first registered backend that opens it: an export on ONNX Runtime, an engine on the
backend whose capabilities run engines (TensorRT), a checkpoint on the one that
loads checkpoints (torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samout_edge.artifact.arch import arch_spec
from samout_edge.artifact.engine import is_engine_dir, resolve_engine
from samout_edge.artifact.graph import PREFILL_UBATCH
from samout_edge.artifact.manifest import is_export_dir
from samout_edge.errors import SamoutError
from samout_edge.runtime.backend import Backend
from samout_edge.runtime.base import Runner
from samout_edge.runtime.registry import BACKENDS, Settings, check_installed, load_runner

KINDS = ("export", "engine", "checkpoint")
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")


def opens(backend: Backend, kind: str) -> bool:
    """Whether ``backend`` runs a target of ``kind`` (its capabilities and loaders say)."""
    if kind == "engine":
        return backend.capabilities.engines
    if kind == "checkpoint":
        return backend.load_checkpoint is not None
    return True


def backends_for(kind: str) -> list[str]:
    return [b.name for b in BACKENDS.values() if opens(b, kind)]


def engine_of(settings: Any) -> str | None:
    """The engine profile a command named (the engine backend's ``--engine``), if any."""
    return getattr(settings, "engine", None) or None


@dataclass(frozen=True)
class Target:
    path: Path  # what the user named
    kind: str  # export | engine | checkpoint
    export_dir: Path | None = None  # the export (an engine's too)
    engine_dir: Path | None = None

    @property
    def default_backend(self) -> str:
        return backends_for(self.kind)[0]


def resolve_target(path: str | Path, engine: str | None = None) -> Target:
    """An export, an engine (``engine``: a profile name of the export's), or a checkpoint."""
    path = Path(path)
    if not path.exists():
        raise SamoutError(f"not found: {path}")
    if engine or is_engine_dir(path):
        export_dir, engine_dir = resolve_engine(path, engine)
        return Target(path, "engine", export_dir, engine_dir)
    if is_export_dir(path):
        return Target(path, "export", path)
    if (path.is_dir() and (path / "config.json").is_file()) or (path.is_file() and path.suffix in STATE_DICT_SUFFIXES):
        return Target(path, "checkpoint")
    raise SamoutError(f"{path} is not an export directory, an engine directory (engines/<profile>) or a checkpoint "
                      "(config.json + model.safetensors, or a .pt/.pth/.bin state_dict)")


def open_runner(target: Target, backend: str = "auto", options: Any = None, arch: str = "cummax",
                heads: int | None = None, logits: str = "last", ubatch: int | None = PREFILL_UBATCH) -> Runner:
    """The runner for ``target`` on ``backend``. A checkpoint runs as ``arch`` (the user's name,
    decoded here; ``heads`` for a bare state_dict) with ``logits``; an export takes every backend.
    ``ubatch``: the most tokens one call takes (0 or None: what the graph takes)."""
    runner = _open(target, backend, options, arch, heads, logits)
    runner.ubatch = check_ubatch(ubatch)
    return runner


def check_ubatch(ubatch: int | None) -> int | None:
    if ubatch is not None and ubatch < 0:
        raise SamoutError(f"--ubatch must be 0 (calls as long as the graph takes) or a number of tokens, got {ubatch}")
    return ubatch or None


def _open(target: Target, backend: str, options: Any, arch: str, heads: int | None, logits: str) -> Runner:
    settings = options if options is not None else Settings()
    name = target.default_backend if backend == "auto" else backend
    spec = BACKENDS.get(name)
    if spec is None:
        raise SamoutError(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")
    if not opens(spec, target.kind):
        raise SamoutError(_wrong_kind(target, name))
    if target.kind == "checkpoint":
        check_installed(spec)
        return spec.load_checkpoint(target.path, spec.options_from(settings), arch_spec(arch), heads, logits)
    directory = target.export_dir
    if spec.capabilities.engines:  # the engine it names, else the export's only one: said before anything loads
        directory = target.engine_dir or resolve_engine(target.export_dir, engine_of(settings))[1]
    return load_runner(directory, name, settings)


def _wrong_kind(target: Target, backend: str) -> str:
    able = " or ".join(f"--backend {b}" for b in backends_for(target.kind))
    if target.kind == "engine":
        title = next(BACKENDS[b].capabilities.title for b in backends_for("engine"))
        return f"{target.path} is a {title} engine: it runs on {able} (or pass its export)"
    return (f"the {backend} backend runs an export directory; {target.path} is a checkpoint "
            f"(use {able}, or export it)")
