"""Runners registered by name: the one place a backend name becomes a runner.

Each loader takes the export directory and the options every backend shares;
an unknown name, or a backend this install lacks, is one clear error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from samout_edge.errors import SamoutError, require_torch
from samout_edge.runtime.base import Runner


@dataclass(frozen=True)
class LoadOptions:
    provider: str = "cpu"  # ORT provider
    device: str | None = None  # torch device: auto | cpu | cuda
    engine: str | None = None  # TensorRT engine profile ("" or None: the only one)
    checkpoint: str | Path | None = None  # torch: the source checkpoint, if it has moved
    cpu_arena: bool = True  # ORT: False returns freed memory to the OS (peak-RSS measurements)
    fast_kernel: bool = True  # torch on CUDA: the Triton cummax
    intra_op_threads: int | None = None  # ORT: threads one call uses (None: ORT's default)
    spinning: bool | None = None  # ORT: threads busy-wait between operators (None: ORT's default, on)


Loader = Callable[[Path, LoadOptions], Runner]
RUNNERS: dict[str, Loader] = {}


def register(name: str) -> Callable[[Loader], Loader]:
    def add(loader: Loader) -> Loader:
        RUNNERS[name] = loader
        return loader

    return add


@register("ort")
def _ort(directory: Path, options: LoadOptions) -> Runner:
    from samout_edge.runtime.ort_runner import load_ort_runner

    return load_ort_runner(directory, options.provider, cpu_arena=options.cpu_arena,
                           intra_op_threads=options.intra_op_threads, spinning=options.spinning)


@register("tensorrt")
def _tensorrt(directory: Path, options: LoadOptions) -> Runner:
    from samout_edge.runtime.tensorrt_runner import load_trt_runner

    return load_trt_runner(directory, profile=options.engine or None)


@register("torch")
def _torch(directory: Path, options: LoadOptions) -> Runner:
    """The export's source checkpoint, eagerly, with the export's arch, dtype,
    logits mode and (quantized exports) dequantized weights, so it computes what
    the graph computes."""
    require_torch("the torch backend")
    from samout_edge.artifact.manifest import read_manifest
    from samout_edge.models.checkpoint import COPY_HINT, source_checkpoint
    from samout_edge.runtime.torch_runner import load_torch_runner, torch_device

    manifest = read_manifest(directory)
    hint = "put it back there, or run the export on another backend (ort)"
    ckpt = source_checkpoint(directory, manifest, options.checkpoint, COPY_HINT if options.checkpoint else hint)
    return load_torch_runner(ckpt, manifest.arch, manifest.dtype, manifest.logits, torch_device(options.device),
                             options.fast_kernel, weights=manifest.weights)


@register("reference")
def _reference(directory: Path, options: LoadOptions) -> Runner:
    """onnx.reference: the graph in its own dtype (fp16 as fp16), slowly; numpy and onnx only."""
    from samout_edge.runtime.reference_runner import load_reference_runner

    return load_reference_runner(directory)


BACKENDS = tuple(RUNNERS)


def load_runner(directory: str | Path, backend: str, options: LoadOptions | None = None) -> Runner:
    """The export in ``directory`` on ``backend``."""
    loader = RUNNERS.get(backend)
    if loader is None:
        raise SamoutError(f"unknown backend {backend!r}; choose one of: {', '.join(RUNNERS)}")
    return loader(Path(directory), options or LoadOptions())
