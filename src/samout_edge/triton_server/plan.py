"""What a Triton model repository holds, decided before anything is written: the model's
tensors and implicit state, the backend (ONNX Runtime or TensorRT), batching, and what
Triton cannot serve as the verified function (refused in one line)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from samout_edge.artifact import graph
from samout_edge.artifact.arch import StateTensor
from samout_edge.artifact.engine import (
    ENGINE_FILE,
    EngineMeta,
    read_engine_meta,
)
from samout_edge.artifact.manifest import (
    MODEL_FILE,
    Manifest,
    check_files,
    check_graph_metadata,
    read_manifest,
)
from samout_edge.errors import SamoutError
from samout_edge.runtime.target import resolve_target

MARKER_FILE = "samout-edge.json"  # in the model directory: what we wrote there
MARKER_KIND = "triton-model"
MARKER_SCHEMA = 1
CONFIG_FILE = "config.pbtxt"
VERSION = "1"
INITIAL_STATE_DIR = "initial_state"
ONNX_PLATFORM = "onnxruntime_onnx"
TENSORRT_PLATFORM = "tensorrt_plan"
PLAN_FILE = "model.plan"  # the TensorRT backend's default model file name
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
TRITON_TYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}
# Session config entries Triton's onnxruntime backend hands to ONNX Runtime (src/onnxruntime.cc).
ORT_BACKEND_SESSION_KEYS = ("session.use_device_allocator_for_initializers",)
DEFAULT_ORT_MAX_BATCH = 8
DEFAULT_IDLE_SECONDS = 60.0
KINDS = ("gpu", "cpu")


@dataclass(frozen=True)
class TritonTensor:
    """One model input or output as config.pbtxt lists it: dims without the batch dim."""

    name: str
    data_type: str  # TYPE_INT64 | TYPE_FP32 | TYPE_FP16
    dims: list[int]  # -1: dynamic


@dataclass(frozen=True)
class TritonState:
    """One implicit state: Triton feeds ``output_name`` of step i as ``input_name`` of step i+1."""

    input_name: str
    output_name: str
    data_type: str
    dims: list[int]
    data_file: str  # under <model>/initial_state/
    initial: str = "empty running max"  # initial_state's name: what the file holds


@dataclass
class RepoPlan:
    """Everything config.pbtxt and the model directory hold, decided before anything is written."""

    name: str
    backend: str  # onnxruntime | tensorrt
    platform: str
    model_file: str  # under 1/
    max_batch_size: int
    inputs: list[TritonTensor]
    outputs: list[TritonTensor]
    states: list[TritonState]
    initial_states: dict[str, bytes]  # file name under initial_state/ -> raw bytes
    copies: dict[str, tuple[Path, str | None]]  # path in the model dir -> (source, expected sha256 or None)
    max_sequences: int
    idle_microseconds: int
    queue_delay_microseconds: int
    instance_kind: str  # KIND_GPU | KIND_CPU
    profiles: list[str] = field(default_factory=list)  # TensorRT optimization profiles the instance may use
    dla_core: int | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class PackageResult:
    repository: Path
    model_dir: Path
    name: str
    backend: str
    platform: str
    max_batch_size: int
    files: dict[str, int]  # path in the model dir -> bytes
    validated: bool  # config.pbtxt parsed as Triton's ModelConfig (tritonclient present)
    notes: list[str]
    config: str  # config.pbtxt's text

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["repository"], data["model_dir"] = str(self.repository), str(self.model_dir)
        return data


# --------------------------------------------------------------------------- names


def check_model_name(name: str) -> str:
    """Triton names a model after its directory and puts the name in URLs
    (/v2/models/NAME): letters, digits, '_', '.', '-' only, starting with a letter or digit."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise SamoutError(f"--name {name!r} is not a usable Triton model name: use letters, digits, '_', '.' or '-' "
                          "(up to 128, starting with a letter or digit)")
    return name


def default_model_name(export_dir: Path, engine_dir: Path | None = None) -> str:
    """The export directory's name (plus the engine's profile), made a valid model name."""
    raw = export_dir.absolute().name + (f"-{engine_dir.name}" if engine_dir is not None else "")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", raw).lstrip("._-")[:128]
    return name or "samout"


# --------------------------------------------------------------------------- planning (no writes)


def refuse_unsupported(manifest: Manifest, backend: str) -> None:
    """What Triton cannot serve as the verified function, refused in one line before any work."""
    if manifest.spec.grows:
        raise SamoutError(
            f"a {manifest.arch} export cannot be served with Triton implicit state: Triton starts every variable state "
            "dim at 1 on a sequence's first request and initial_state allows no variable dims, so a KV cache that "
            "starts empty (past_seq 0) cannot be expressed; package a cummax export, or one with a softmax window "
            "(--softmax-window W: a fixed-shape state)")
    if backend == "onnxruntime":
        config = manifest.weights.ort_session_config
        unsupported = [k for k in config if k not in ORT_BACKEND_SESSION_KEYS]
        if unsupported:
            raise SamoutError(
                f"this {manifest.weights.kind} export ({manifest.weights.format} format) needs the ONNX Runtime "
                f"session config entry {unsupported[0]}={config[unsupported[0]]}, and Triton's onnxruntime backend passes "
                f"only {', '.join(ORT_BACKEND_SESSION_KEYS)}; re-export with --weights-format matmulnbits, "
                "or build a TensorRT engine from it")


def check_state_pairing(mapping: dict[str, str]) -> None:
    """Triton pairs output state i with input state i in name order (core's
    SequenceStates::OutputState); refuse names whose sorted orders disagree."""
    outputs, inputs = sorted(mapping), sorted(mapping.values())
    for out, inp in zip(outputs, inputs):
        if mapping[out] != inp:
            raise SamoutError(f"Triton would feed state output {out!r} into {inp!r} (it pairs states by name order), "
                              f"but the graph feeds it into {mapping[out]!r}")


# the scan that carries a state (artifact/arch.py; None: a softmax window) -> its initial state file, described
EMPTY_STATES = {"max": ("empty_max", "empty running max"), "linear": ("empty_linear", "empty linear recurrence (zeros)"),
                None: ("empty_window", "empty softmax window (zeros)")}


def initial_state_bytes(tensor: StateTensor, dtype_name: str, dims: list[int]) -> bytes:
    """A state tensor's empty value by the spec's rule (StateTensor.fill): the running max's is
    the dtype's lowest finite value, not zeros (a zero past would clip every negative
    activation); a softmax window's and a linear h's are zeros; as raw little-endian row-major bytes."""
    np_dtype = graph.numpy_dtype(dtype_name)
    return np.full(math.prod(dims), tensor.empty_value(np_dtype), dtype=np_dtype.newbyteorder("<")).tobytes()


def _triton_type(numpy_name: str) -> str:
    try:
        return TRITON_TYPES[numpy_name]
    except KeyError:
        raise SamoutError(f"Triton has no data type for {numpy_name}") from None


def _dims(shape: list[int | str]) -> list[int]:
    """Graph shape -> config dims: the batch dim goes (Triton adds it), named dims become -1."""
    return [d if isinstance(d, int) else -1 for d in shape[1:]]


def model_io(manifest: Manifest) -> tuple[list[TritonTensor], list[TritonTensor], list[TritonState], dict[str, bytes]]:
    """The config's inputs, outputs and states from the graph contract (artifact.graph), and the initial state files."""
    spec = manifest.spec
    inputs, outputs = graph.graph_io(manifest.config, spec, manifest.dtype, manifest.logits)
    by_name = {t.name: t for t in inputs}
    mapping = graph.present_to_past(spec, manifest.config.num_layers)
    check_state_pairing(mapping)
    kinds = {t.past: t for t in spec.states(manifest.config.num_layers)}
    states, files = [], {}
    for out in outputs:
        if out.name == graph.LOGITS:
            continue
        past = by_name[mapping[out.name]]
        dims = _dims(past.shape)
        if -1 in dims:  # refuse_unsupported catches softmax first; this guards the contract itself
            raise SamoutError(f"state {past.name} has a variable dim {past.shape}; Triton cannot start it empty")
        stem, what = EMPTY_STATES[kinds[past.name].scan]
        data_file = f"{stem}.{manifest.dtype}"
        states.append(TritonState(past.name, out.name, _triton_type(past.dtype), dims, data_file, what))
        files[data_file] = initial_state_bytes(kinds[past.name], manifest.dtype, dims)
    ids = by_name[graph.INPUT_IDS]
    logits = next(t for t in outputs if t.name == graph.LOGITS)
    return ([TritonTensor(ids.name, _triton_type(ids.dtype), _dims(ids.shape))],
            [TritonTensor(logits.name, _triton_type(logits.dtype), _dims(logits.shape))], states, files)


def check_graph(export_dir: Path, manifest: Manifest) -> list[str]:
    """model.onnx's own metadata and I/O must be what export.json says (export.json is
    covered by no hash; the config is written from it). Returns the external data files."""
    import onnx


    model = onnx.load(str(export_dir / MODEL_FILE), load_external_data=False)
    check_graph_metadata({p.key: p.value for p in model.metadata_props}, manifest)
    initializers = {t.name for t in model.graph.initializer}
    found_in = [(i.name, i.type.tensor_type) for i in model.graph.input if i.name not in initializers]
    found_out = [(o.name, o.type.tensor_type) for o in model.graph.output]
    want_in, want_out = graph.graph_io(manifest.config, manifest.spec, manifest.dtype, manifest.logits)
    for kind, found, want in (("inputs", found_in, want_in), ("outputs", found_out, want_out)):
        got = [(name, graph.ONNX_TYPE_NAMES.get(t.elem_type), len(t.shape.dim)) for name, t in found]
        expected = [(s.name, s.dtype, len(s.shape)) for s in want]
        if got != expected:
            raise SamoutError(f"{export_dir / MODEL_FILE} {kind} {got} are not the graph contract's {expected}; re-export")
    external = set()
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            external.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(external)


def plan_repo(
    target: str | Path,
    name: str | None = None,
    engine: str | None = None,
    max_batch_size: int | None = None,
    max_sequences: int | None = None,
    idle_seconds: float = DEFAULT_IDLE_SECONDS,
    queue_delay_us: int = 0,
    kind: str = "gpu",
) -> RepoPlan:
    """Decide the model directory for TARGET (an export: ONNX Runtime; an engine dir:
    TensorRT) after checking every file it copies against export.json's sha256."""
    resolved = resolve_target(target, engine)
    if resolved.kind == "checkpoint":
        raise SamoutError(f"{target} is a checkpoint; package takes an export directory or an engine directory "
                          "(EXPORT/engines/PROFILE): export it first")
    export_dir, engine_dir = resolved.export_dir, resolved.engine_dir
    backend = "onnxruntime" if engine_dir is None else "tensorrt"
    manifest = read_manifest(export_dir)
    refuse_unsupported(manifest, backend)
    name = check_model_name(name) if name is not None else default_model_name(export_dir, engine_dir)
    if kind not in KINDS:
        raise SamoutError(f"--kind {kind!r} is not one of {', '.join(KINDS)}")
    if idle_seconds <= 0 or not math.isfinite(idle_seconds):
        raise SamoutError(f"--idle-seconds must be positive, got {idle_seconds}")
    if queue_delay_us < 0:
        raise SamoutError(f"--queue-delay-us must be 0 or more, got {queue_delay_us}")
    check_files(export_dir, manifest)  # a corrupted export fails here, loudly, before anything is copied
    external = check_graph(export_dir, manifest)
    inputs, outputs, states, initial = model_io(manifest)
    source: dict[str, Any] = {"export": str(export_dir.absolute()), "arch": manifest.arch, "dtype": manifest.dtype,
                              "logits": manifest.logits, "max_seq": manifest.max_seq, "lowering": manifest.lowering,
                              "weights": manifest.weights.kind,
                              "onnx_sha256": manifest.files[MODEL_FILE]["sha256"]}
    notes = [f"prefill is correct up to max_seq {manifest.max_seq} tokens per request (longer returns NaN logits and "
             "poisons the sequence's state); decode steps are unlimited"]
    common = dict(name=name, inputs=inputs, outputs=outputs, states=states, initial_states=initial,
                  idle_microseconds=round(idle_seconds * 1e6), queue_delay_microseconds=queue_delay_us, source=source)
    if engine_dir is None:
        plan = _plan_onnxruntime(export_dir, manifest, external, max_batch_size, kind, common, notes)
    else:
        plan = _plan_tensorrt(export_dir, engine_dir, manifest, max_batch_size, kind, common, notes)
    plan.max_sequences = _max_sequences(max_sequences, plan.max_batch_size)
    return plan


def _max_sequences(asked: int | None, max_batch_size: int) -> int:
    """Candidate sequences per instance (oldest strategy): more than a batch, so a batch
    can form while some sequences are between steps; a cummax state is a few KiB each."""
    if asked is None:
        return 4 * max_batch_size
    if asked < max_batch_size:
        raise SamoutError(f"--max-sequences {asked} is below --max-batch-size {max_batch_size}: batches could never fill")
    return asked


def _plan_onnxruntime(export_dir: Path, manifest: Manifest, external: list[str], max_batch_size: int | None,
                      kind: str, common: dict, notes: list[str]) -> RepoPlan:
    copies: dict[str, tuple[Path, str | None]] = {f"{VERSION}/{MODEL_FILE}": (export_dir / MODEL_FILE,
                                                                             manifest.files[MODEL_FILE]["sha256"])}
    for location in external:  # model.onnx names them relative to itself: they go beside it
        rel = Path(location)
        if rel.is_absolute() or ".." in rel.parts or location not in manifest.files:
            raise SamoutError(f"{MODEL_FILE} keeps weights in {location!r}, which export.json does not list with a "
                              "sha256; re-export")
        copies[f"{VERSION}/{location}"] = (export_dir / location, manifest.files[location]["sha256"])
    batch = DEFAULT_ORT_MAX_BATCH if max_batch_size is None else max_batch_size
    if batch < 1:
        raise SamoutError(f"--max-batch-size must be at least 1, got {batch}")
    session = manifest.weights.ort_session_config
    onnxruntime_version = manifest.tools.get("onnxruntime", "unknown")
    notes.append(f"verified with ONNX Runtime {onnxruntime_version} (opset {manifest.opset}): use a Triton release "
                 "whose onnxruntime backend ships that ONNX Runtime or newer (its release notes list the version)")
    if manifest.weights.format == "matmulnbits":
        notes.append(f"{manifest.weights.kind} weights in ONNX Runtime's com.microsoft MatMulNBits/GatherBlockQuantized "
                     "ops: older ONNX Runtime releases lack them (or their 8-bit form) and fail to load the model")
    return RepoPlan(backend="onnxruntime", platform=ONNX_PLATFORM, model_file=MODEL_FILE, max_batch_size=batch,
                    copies=copies, max_sequences=0, instance_kind=f"KIND_{kind.upper()}", parameters=dict(session),
                    notes=notes, **common)


def _plan_tensorrt(export_dir: Path, engine_dir: Path, manifest: Manifest, max_batch_size: int | None, kind: str,
                   common: dict, notes: list[str]) -> RepoPlan:
    meta: EngineMeta = read_engine_meta(engine_dir)
    rebuild = f"rebuild it: samout-edge build {export_dir} --profile {meta.profile}"
    if kind != "gpu":
        raise SamoutError("a TensorRT engine runs on the GPU only; drop --kind cpu (or package the export for ONNX Runtime)")
    if meta.onnx_sha256 != manifest.files[MODEL_FILE]["sha256"]:
        raise SamoutError(f"the engine in {engine_dir} was built from another model.onnx than the one in {export_dir}; {rebuild}")
    if meta.arch != manifest.arch:
        raise SamoutError(f"engine.json says arch {meta.arch}, export.json says {manifest.arch}; {rebuild}")
    if (meta.plan or {}).get("cummax") == "jit":
        raise SamoutError(f"the engine runs its CumMax plugin just in time, calling back into Python (TensorRT {meta.tensorrt}); "
                          "Triton's TensorRT backend cannot; build with TensorRT 10.9+ (ahead-of-time plugin) or export "
                          "with --lowering native")
    if not (engine_dir / ENGINE_FILE).is_file():
        raise SamoutError(f"{engine_dir / ENGINE_FILE} is missing; {rebuild}")
    if not meta.optimization_profiles:
        raise SamoutError(f"engine.json in {engine_dir} lists no optimization profiles; {rebuild}")
    ranges = []
    for prof in meta.optimization_profiles:
        shape = next((s for s in prof.shapes if s.name == graph.INPUT_IDS), None)
        if shape is None or len(shape.min) != 2 or len(shape.max) != 2:
            raise SamoutError(f"engine.json profile {prof.name!r} has no [batch, seq] range for {graph.INPUT_IDS}; {rebuild}")
        ranges.append((shape.min[0], shape.max[0]))
    if min(lo for lo, _ in ranges) > 1:
        raise SamoutError(f"every optimization profile of the engine starts above batch 1 ({ranges}); Triton sends "
                          f"batches from 1 up; {rebuild}")
    engine_max = min(hi for _, hi in ranges)  # a batch of prefills must fit every profile Triton may pick
    batch = engine_max if max_batch_size is None else max_batch_size
    if not 1 <= batch <= engine_max:
        raise SamoutError(f"--max-batch-size {batch} is outside what every profile of the engine takes (1 to {engine_max})")
    notes.append(f"the engine runs only under TensorRT {meta.tensorrt} on {meta.gpu} (sm {meta.compute_capability}): "
                 "use the Triton release that ships that TensorRT (its release notes list it)")
    if meta.plugins:
        notes.append(f"plugins {', '.join(meta.plugins)}: ahead-of-time, their kernels are inside the engine "
                     "(unverified under Triton)")
    common["source"] = {**common["source"], "engine": str(engine_dir.absolute()), "tensorrt": meta.tensorrt,
                        "gpu": meta.gpu, "profile": meta.profile}
    return RepoPlan(backend="tensorrt", platform=TENSORRT_PLATFORM, model_file=PLAN_FILE, max_batch_size=batch,
                    copies={f"{VERSION}/{PLAN_FILE}": (engine_dir / ENGINE_FILE, None)}, max_sequences=0,
                    instance_kind="KIND_GPU", profiles=[str(i) for i in range(len(meta.optimization_profiles))],
                    dla_core=meta.dla_core, notes=notes, **common)
