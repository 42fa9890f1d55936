"""Backends registered by name: the only list of them, and where a name becomes a runner.

Each backend owns its options, as Polygraphy's loaders own their arguments: a
frozen dataclass of the settings it reads (ONNX Runtime's provider and threads,
torch's device, TensorRT's engine profile, OpenVINO's device and precision).
Callers hand ``load_runner`` one ``Settings`` (what a command line was given);
the backend takes the fields it declares and ignores the rest. A new backend is
one runner file and one ``register`` call here; the CLI's choices come from
``BACKENDS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from samout_edge.errors import SamoutError, require_torch
from samout_edge.runtime.base import Runner


@dataclass(frozen=True)
class Settings:
    """Every backend option a command may be given; each backend reads its own (its options type)."""

    provider: str = "cpu"  # ort: the execution provider
    device: str | None = None  # torch: auto | cpu | cuda
    engine: str | None = None  # tensorrt: the engine's profile ("" or None: the only one)
    checkpoint: str | Path | None = None  # torch: the source checkpoint, if it has moved
    cpu_arena: bool = True  # ort: False returns freed memory to the OS (peak-RSS measurements)
    fast_kernel: bool = True  # torch on CUDA: the Triton cummax
    intra_op_threads: int | None = None  # ort: threads one call uses (None: ORT's default)
    spinning: bool | None = None  # ort: threads busy-wait between operators (None: ORT's default, on)
    openvino_device: str = "CPU"  # openvino: CPU | GPU | NPU ...
    openvino_precision: str = "f32"  # openvino: f32 (verify's tolerance) | bf16 | f16 (faster, looser)


LoadOptions = Settings  # the name callers used before backends owned their options


@dataclass(frozen=True)
class OrtOptions:
    provider: str = "cpu"
    cpu_arena: bool = True
    intra_op_threads: int | None = None
    spinning: bool | None = None


@dataclass(frozen=True)
class TorchOptions:
    device: str | None = None
    checkpoint: str | Path | None = None
    fast_kernel: bool = True


@dataclass(frozen=True)
class TensorRTOptions:
    engine: str | None = None


@dataclass(frozen=True)
class ReferenceOptions:
    pass


@dataclass(frozen=True)
class OpenVINOOptions:
    openvino_device: str = "CPU"
    openvino_precision: str = "f32"


@dataclass(frozen=True)
class Backend:
    name: str
    options: type  # the frozen dataclass of what it reads
    load: Callable[[Path, Any], Runner]  # (export directory, its options) -> runner
    summary: str
    activations: tuple[str, ...] = ("fp",)  # what its quantized MatMuls can compute with (export.json weights)

    def options_from(self, settings: Settings) -> Any:
        return self.options(**{f.name: getattr(settings, f.name) for f in fields(self.options)})


BACKENDS: dict[str, Backend] = {}


def register(name: str, options: type, summary: str, activations: tuple[str, ...] = ("fp",)) -> Callable:
    def add(load: Callable[[Path, Any], Runner]) -> Callable[[Path, Any], Runner]:
        BACKENDS[name] = Backend(name, options, load, summary, activations)
        return load

    return add


@register("ort", OrtOptions, "ONNX Runtime, on any of its execution providers (--provider)", ("fp", "int8"))
def _ort(directory: Path, options: OrtOptions) -> Runner:
    from samout_edge.runtime.ort_runner import load_ort_runner

    return load_ort_runner(directory, options.provider, cpu_arena=options.cpu_arena,
                           intra_op_threads=options.intra_op_threads, spinning=options.spinning)


@register("tensorrt", TensorRTOptions, "a TensorRT engine built from the export (--engine PROFILE)")
def _tensorrt(directory: Path, options: TensorRTOptions) -> Runner:
    from samout_edge.runtime.tensorrt_runner import load_trt_runner

    return load_trt_runner(directory, profile=options.engine or None)


@register("torch", TorchOptions, "PyTorch eager on the export's source checkpoint (--device; needs torch)",
          ("fp", "int8"))  # int8: it emulates the kernel's quantization (models/quantize.py)
def _torch(directory: Path, options: TorchOptions) -> Runner:
    """The export's source checkpoint, eagerly, with the export's arch, dtype,
    logits mode and (quantized exports) dequantized weights, so it computes what
    the graph computes."""
    require_torch("the torch backend")
    from samout_edge.artifact.manifest import read_manifest, stated_alpha
    from samout_edge.models.checkpoint import COPY_HINT, source_checkpoint
    from samout_edge.runtime.torch_runner import load_torch_runner, torch_device

    manifest = read_manifest(directory)
    hint = "put it back there, or run the export on another backend (ort)"
    ckpt = source_checkpoint(directory, manifest, options.checkpoint, COPY_HINT if options.checkpoint else hint)
    return load_torch_runner(ckpt, manifest.arch, manifest.dtype, manifest.logits, torch_device(options.device),
                             options.fast_kernel, export_dir=directory, alpha=stated_alpha(manifest))


@register("reference", ReferenceOptions, "onnx.reference: the graph computed in its own dtype (slow)")
def _reference(directory: Path, options: ReferenceOptions) -> Runner:
    """onnx.reference: the graph in its own dtype (fp16 as fp16), slowly; numpy and onnx only."""
    from samout_edge.runtime.reference_runner import load_reference_runner

    return load_reference_runner(directory)


@register("openvino", OpenVINOOptions, "OpenVINO (--openvino-device, --openvino-precision; pip install openvino)")
def _openvino(directory: Path, options: OpenVINOOptions) -> Runner:
    from samout_edge.runtime.openvino_runner import load_openvino_runner

    return load_openvino_runner(directory, options.openvino_device, options.openvino_precision)


RUNNERS = BACKENDS  # the registry under its earlier name


def load_runner(directory: str | Path, backend: str, settings: Settings | None = None) -> Runner:
    """The export in ``directory`` on ``backend``, given what a command was told."""
    found = BACKENDS.get(backend)
    if found is None:
        raise SamoutError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    check_activations(Path(directory), found)
    return found.load(Path(directory), found.options_from(settings or Settings()))


def check_activations(directory: Path, backend: Backend) -> None:
    """An export whose MatMuls compute with int8 activations is a different function from its
    dequantized weights in fp32: a backend that would run the latter is refused in one line."""
    from samout_edge.artifact.engine import is_engine_dir
    from samout_edge.artifact.manifest import read_manifest

    if is_engine_dir(directory) or not (directory / "export.json").is_file():
        return  # an engine, or not an export at all: the backend's own loader says what is wrong
    activations = read_manifest(directory).weights.activations
    if activations not in backend.activations:
        able = ", ".join(b.name for b in BACKENDS.values() if activations in b.activations)
        raise SamoutError(f"this export computes its MatMuls with {activations} activations (export --activations "
                          f"{activations}: ONNX Runtime's MatMulNBits at accuracy level 4), which the {backend.name} "
                          f"backend does not: run it on {able}")
