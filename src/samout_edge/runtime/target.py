"""What a path names, and the runner that runs it: the one place every command asks.

A target is an export directory, an engine directory (``EXPORT/engines/PROFILE``,
or an export with ``--engine PROFILE``), or a checkpoint (a directory with
config.json + model.safetensors, or a state_dict file). ``auto`` runs an engine
on TensorRT, an export on ONNX Runtime and a checkpoint on PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from samout_edge.artifact.config import check_arch
from samout_edge.artifact.engine import is_engine_dir, resolve_engine
from samout_edge.artifact.manifest import is_export_dir
from samout_edge.errors import SamoutError, require_torch
from samout_edge.runtime.base import Runner
from samout_edge.runtime.registry import RUNNERS, LoadOptions, load_runner

KINDS = ("export", "engine", "checkpoint")
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")


@dataclass(frozen=True)
class Target:
    path: Path  # what the user named
    kind: str  # export | engine | checkpoint
    export_dir: Path | None = None  # the export (an engine's too)
    engine_dir: Path | None = None

    @property
    def default_backend(self) -> str:
        return {"export": "ort", "engine": "tensorrt", "checkpoint": "torch"}[self.kind]


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


def open_runner(target: Target, backend: str = "auto", options: LoadOptions | None = None, arch: str = "cummax",
                heads: int | None = None, logits: str = "last") -> Runner:
    """The runner for ``target`` on ``backend``. A checkpoint runs on torch as ``arch``
    (``heads`` for a bare state_dict) with ``logits``; an export takes every backend."""
    options = options or LoadOptions()
    backend = target.default_backend if backend == "auto" else backend
    if backend not in RUNNERS:
        raise SamoutError(f"unknown backend {backend!r}; choose one of: auto, {', '.join(RUNNERS)}")
    if target.kind == "engine" and backend != "tensorrt":
        raise SamoutError(f"{target.path} is a TensorRT engine: it runs on --backend tensorrt (or pass its export)")
    if target.kind == "checkpoint":
        if backend != "torch":
            raise SamoutError(f"the {backend} backend runs an export directory; {target.path} is a checkpoint "
                              "(use --backend torch, or export it)")
        require_torch("running a checkpoint")
        from samout_edge.models.checkpoint import load_checkpoint
        from samout_edge.runtime.torch_runner import load_torch_runner, torch_device

        return load_torch_runner(load_checkpoint(target.path, heads), check_arch(arch), "fp32", logits,
                                 torch_device(options.device), options.fast_kernel)
    if backend == "tensorrt":
        engine_dir = target.engine_dir or resolve_engine(target.export_dir, options.engine)[1]
        options = replace(options, engine=engine_dir.name)
    return load_runner(target.export_dir, backend, options)
