"""Build a runner for an export directory on a named backend."""

from __future__ import annotations

from pathlib import Path

from samout_edge.errors import SamoutError
from samout_edge.exporter.manifest import read_manifest, source_checkpoint
from samout_edge.runtime.base import Runner

BACKENDS = ("torch", "ort", "tensorrt")


def torch_device(device: str | None) -> str:
    """'auto' or None -> cuda when available, else cpu; a named device is checked."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SamoutError(f"device {device!r} asked for, but torch sees no CUDA device here")
    return device


def load_runner(
    directory: str | Path,
    backend: str,
    provider: str = "cpu",
    device: str | None = None,
    checkpoint: str | Path | None = None,
    cpu_arena: bool = True,
    fast_kernel: bool = True,
) -> Runner:
    """The export in ``directory`` on ``backend``.

    torch runs the export's source checkpoint eagerly, with the export's arch,
    dtype and logits mode, so it computes what the graph computes. For tensorrt,
    ``provider`` names the engine's profile ("" when the export has one engine).
    """
    if backend not in BACKENDS:
        raise SamoutError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    directory = Path(directory)
    if backend == "ort":
        from samout_edge.runtime.ort_runner import load_ort_runner

        return load_ort_runner(directory, provider, cpu_arena=cpu_arena)
    if backend == "tensorrt":
        from samout_edge.runtime.trt_runner import load_trt_runner

        return load_trt_runner(directory, profile=provider or None)
    from samout_edge.runtime.torch_runner import load_torch_runner

    manifest = read_manifest(directory)
    ckpt = source_checkpoint(directory, manifest, checkpoint)
    return load_torch_runner(ckpt, manifest.arch, manifest.dtype, manifest.logits, torch_device(device), fast_kernel)
