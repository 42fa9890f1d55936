"""ONNX Runtime over an export directory, on any of its execution providers: the runner, the
options it reads and what it computes (the ``ort`` backend)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from samout_edge.artifact import graph
from samout_edge.artifact.capabilities import Capabilities
from samout_edge.artifact.manifest import MODEL_FILE, Manifest, check_graph_metadata, read_manifest
from samout_edge.artifact.quantization import RTOL_FP16_ARITHMETIC
from samout_edge.errors import SamoutError
from samout_edge.runtime.backend import Backend, BackendOptions, option
from samout_edge.runtime.base import Runner, RunnerInfo, State
from samout_edge.runtime.cpu import cpu_features, cpu_workers

DISABLE_KLEIDIAI = "mlas.disable_kleidiai"  # ONNX Runtime's session config key (its aarch64 builds; exporter/quantize.py)
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def quiet_onnxruntime() -> None:
    """ONNX Runtime logs graph-cleanup warnings to stderr; our output is ours."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)


def return_freed_heap() -> None:
    """Hand the C heap's free memory back to the OS (glibc's malloc_trim; elsewhere nothing).

    Loading frees what it built on the way (the model's protobuf, initializers before
    pre-packing) but glibc keeps freed blocks below the top of the heap mapped: 6 MB of the
    seed int4 process's RSS once loaded, held for its whole life (docs/benchmarking.md).
    """
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library this process already has
    except (OSError, AttributeError):  # musl, macOS: no malloc_trim
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def available_providers() -> list[str]:
    import onnxruntime as ort

    # Azure is a remote-inference shim, not a local device.
    return [p for p in ort.get_available_providers() if p != "AzureExecutionProvider"]


def resolve_provider(name: str) -> str:
    provider = PROVIDER_ALIASES.get(name.lower(), name)
    available = available_providers()
    if provider not in available:
        raise SamoutError(
            f"ONNX Runtime provider {name!r} is not available here; available: {', '.join(available)}"
            + ("" if "CUDAExecutionProvider" in available else " (install onnxruntime-gpu for CUDA/TensorRT)")
        )
    return provider


class OrtRunner(Runner):
    def __init__(self, session, manifest: Manifest, provider: str):
        self.session = session
        self.manifest = manifest
        self.to_past = graph.present_to_past(manifest.spec, manifest.config.num_layers)
        self.output_names = [o.name for o in session.get_outputs()]
        cpu = cpu_features() if provider == "CPUExecutionProvider" else None
        fp16 = cpu is not None and cpu.fp16_arithmetic and manifest.dtype == "fp16"
        self.info = RunnerInfo(
            "ort", provider + (" (fp16 arithmetic)" if fp16 else ""), manifest.spec, manifest.dtype, manifest.logits,
            manifest.max_seq, manifest.config, rtol=RTOL_FP16_ARITHMETIC if fp16 else None,
            kernel_family=cpu.kernel_family if cpu is not None else "x86",
            computes_fp16=cpu is None or fp16,  # the GPU providers compute fp16 in fp16; x86's CPU upcasts
            memory="host" if cpu is not None else None,  # the GPU providers' allocators expose no peak
        )

    def initial_state(self, batch: int) -> State:
        return graph.empty_state(self.manifest.config, self.manifest.spec, batch, self.manifest.dtype)

    def close(self) -> None:
        self.session = None

    def run_impl(self, input_ids, state: State):
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64), **state}
        outputs = self.session.run(self.output_names, feeds)
        results = dict(zip(self.output_names, outputs))
        return results["logits"], {self.to_past[k]: v for k, v in results.items() if k in self.to_past}


def session_config(weights) -> dict[str, str]:
    """The export's ONNX Runtime session config, and for int8 activations KleidiAI off in any case
    (exports made before export.json carried it): its kernels quantize activations another way
    than the ones verify's bounds are derived for."""
    config = dict(weights.ort_session_config)
    if weights.activations == "int8":
        config.setdefault(DISABLE_KLEIDIAI, "1")
    return config


def load_ort_runner(
    directory: str | Path,
    provider: str = "cpu",
    cpu_arena: bool = True,
    intra_op_threads: int | None = None,
    spinning: bool | None = None,
) -> OrtRunner:
    """``cpu_arena=False`` returns freed memory to the OS, so peak-RSS measurements see it.

    ``intra_op_threads``: threads one call uses (None: ORT's default, one per
    physical core). ``spinning``: whether those threads busy-wait for work
    between operators (None: ORT's default, on); off costs a few percent on an
    idle machine and saves a lot on a shared one, where spinning threads take
    cores from the threads that have work.
    """
    import onnxruntime as ort

    manifest = read_manifest(directory)
    provider = resolve_provider(provider)
    quiet_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = cpu_arena
    if provider == "CPUExecutionProvider":
        # ONNX Runtime's buffer-reuse plan (and the memory pattern built on it) holds more than
        # it saves here: seed int4, a 256-token call 13.0 -> 9.1 MB above the model, calls of
        # 256 up to 1k-16k tokens 23.0 -> 14.1, at x0.93-1.005 the time (every arch, int4, fp32
        # and int8 compute; docs/benchmarking.md). Off, each output takes a block of the arena.
        options.enable_mem_reuse = False
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    for key, value in session_config(manifest.weights).items():
        options.add_session_config_entry(key, value)  # a quantized export's settings: compute the verified function
    try:
        session = ort.InferenceSession(str(Path(directory) / MODEL_FILE), options, providers=[provider])
    except Exception as e:  # ORT raises its own exception types for bad graphs
        raise SamoutError(f"ONNX Runtime cannot load {Path(directory) / MODEL_FILE}: {str(e).splitlines()[0]}") from None
    return_freed_heap()
    check_graph_metadata(session.get_modelmeta().custom_metadata_map, manifest)
    return OrtRunner(session, manifest, provider)


@dataclass(frozen=True)
class OrtOptions(BackendOptions):
    provider: str | None = option("cpu", "ONNX Runtime execution provider: cpu, cuda, tensorrt or a full name.")
    spinning: bool | None = option(None, "ONNX Runtime: let intra-op threads busy-wait between operators "
                                   "(default: ONNX Runtime's own, on).")
    cpu_arena: bool = option(True, "False returns freed memory to the OS (peak-RSS measurements).", cli=False)
    intra_op_threads: int | None = option(None, "Threads one call uses (None: ONNX Runtime's default).", cli=False)

    def for_bench(self) -> list[OrtOptions]:
        """One run per provider asked for (comma-separated; None: every available one)."""
        names = [p.strip() for p in self.provider.split(",") if p.strip()] if self.provider else available_providers()
        return [replace(self, provider=resolve_provider(p)) for p in names]

    def for_eval(self, stream: bool, grows: bool) -> tuple[OrtOptions, int]:
        """Windows on the CPU: two single-threaded calls at once (runtime/cpu.py cpu_workers).
        Threads do not spin unless --spinning says so (a waiting thread takes a core from the
        other call), and a softmax stream, which calls the graph with a longer cache each time,
        returns memory instead of keeping an arena of every size it saw (23 GB at 62k tokens of
        the pair)."""
        spinning = bool(self.spinning)
        if not stream and resolve_provider(self.provider or "cpu") == "CPUExecutionProvider":
            workers, threads = cpu_workers()
            return replace(self, intra_op_threads=threads, spinning=spinning), workers
        return replace(self, spinning=spinning, cpu_arena=not grows), 1

    def for_peak_memory(self) -> OrtOptions:
        return replace(self, cpu_arena=False)


def _load(directory: Path, options: OrtOptions) -> OrtRunner:
    return load_ort_runner(directory, options.provider or "cpu", cpu_arena=options.cpu_arena,
                           intra_op_threads=options.intra_op_threads, spinning=options.spinning)


BACKEND = Backend(
    "ort", OrtOptions, _load, "ONNX Runtime, on any of its execution providers (--provider)",
    Capabilities("ONNX Runtime", activations=("fp", "int8")),
)
