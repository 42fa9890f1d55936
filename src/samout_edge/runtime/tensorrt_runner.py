"""TensorRT engines behind the Runner interface, on Polygraphy's TrtRunner.

Needs TensorRT, Polygraphy (the `[tensorrt]` extra) and a CUDA GPU; no torch
(a Jetson has no CUDA build of it). Values are Polygraphy device views: the state
one step returns is the next step's input on the GPU, never copied through the
host. One-token calls use the engine's decode optimization profile, longer ones
its prefill profile (TrtRunner.set_profile).

Buffer ownership: TrtRunner writes every output into its output allocator's
buffer for that name and reuses it next call, so feeding a state output back as
an input would alias it (and a growing KV cache would be reallocated under the
engine's feet). After each call the runner takes the output buffers out of the
allocator; each returned value keeps its buffer until the caller drops it, then
the buffer goes back to a pool the allocator draws from. A value therefore stays
valid as long as it is referenced, and steady-state decoding allocates nothing.

An engine is only valid for the TensorRT, GPU and model.onnx that built it: the
loader checks engine.json (artifact.engine.check_compatible) before it
deserializes anything, and says how to rebuild.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from samout_edge.artifact import graph
from samout_edge.artifact.arch import ArchSpec
from samout_edge.artifact.engine import (
    ENGINE_FILE,
    EngineMeta,
    check_compatible,
    is_engine_dir,
    read_engine_meta,
    resolve_engine,
)
from samout_edge.artifact.files import sha256_file
from samout_edge.artifact.manifest import MODEL_FILE, Manifest, read_manifest
from samout_edge.errors import SamoutError, install_hint
from samout_edge.runtime.backend import Backend, BackendOptions, option
from samout_edge.runtime.base import Runner, RunnerInfo, State, past_length
from samout_edge.tensorrt import versions

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = ["BACKEND", "ProfileRanges", "TensorRTOptions", "TensorRTRunner", "check_compatible", "is_engine_dir",
           "load_trt_runner",
           "profile_ranges", "resolve_engine", "select_profile"]

NUMPY_TYPES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64", "BOOL": "bool"}
STATE_DTYPES = {"float32": "fp32", "float16": "fp16"}


@dataclass(frozen=True)
class ProfileRanges:
    name: str
    index: int
    batch: tuple[int, int]
    seq: tuple[int, int]
    past: tuple[int, int] | None  # softmax past_seq range; None for cummax


def profile_ranges(meta: EngineMeta, spec: ArchSpec) -> list[ProfileRanges]:
    """The batch/seq/past ranges of each optimization profile, in engine order."""
    out = []
    grown = [t for t in spec.named_states if t.grows]
    for index, prof in enumerate(meta.optimization_profiles):
        ids = prof.shape(graph.INPUT_IDS)
        past = None
        if grown:
            first = prof.shape(grown[0].past)
            past = (grown[0].length(first.min), grown[0].length(first.max))
        out.append(ProfileRanges(prof.name, index, (ids.min[0], ids.max[0]), (ids.min[1], ids.max[1]), past))
    return out


def select_profile(ranges: list[ProfileRanges], batch: int, seq: int, past: int) -> ProfileRanges:
    """The decode profile for one token, else the first whose ranges hold the call's shapes."""
    def holds(r: ProfileRanges) -> bool:
        ok = r.batch[0] <= batch <= r.batch[1] and r.seq[0] <= seq <= r.seq[1]
        return ok and (r.past is None or r.past[0] <= past <= r.past[1])

    preferred = sorted(ranges, key=lambda r: (r.name != "decode") if seq == 1 else (r.name != "prefill"))
    for r in preferred:
        if holds(r):
            return r
    described = "; ".join(f"{r.name}: batch {r.batch[0]}..{r.batch[1]}, seq {r.seq[0]}..{r.seq[1]}"
                          + (f", past {r.past[0]}..{r.past[1]}" if r.past else "") for r in ranges)
    raise SamoutError(f"batch {batch}, seq {seq}, past {past} is outside every optimization profile of the engine ({described})")


class _Pool:
    """Device buffers by output name, waiting to be lent to TrtRunner's allocator again."""

    def __init__(self) -> None:
        self.free: dict[str, list[Any]] = {}
        self.closed = False

    def take(self, key: str) -> Any | None:
        arrays = self.free.get(key)
        return arrays.pop() if arrays else None

    def give(self, key: str, array: Any) -> None:
        if self.closed:
            array.free()
        else:
            self.free.setdefault(key, []).append(array)

    def close(self) -> None:
        self.closed = True
        for arrays in self.free.values():
            for array in arrays:
                array.free()
        self.free.clear()


@lru_cache(maxsize=1)
def _held_type() -> type:
    """A DeviceView that owns its buffer until dropped (defined lazily: Polygraphy is an extra)."""
    from polygraphy import cuda

    class Held(cuda.DeviceView):  # type: ignore[misc, name-defined]
        def __init__(self, array: Any, shape: tuple[int, ...], dtype: Any, release: Callable[[Any], None] | None):
            super().__init__(array.ptr, shape, dtype)
            self._array, self._release = array, release

        def __del__(self) -> None:
            release, self._release = self._release, None
            if release is not None:
                try:
                    release(self._array)
                except Exception:  # interpreter shutdown: the CUDA wrapper may be gone
                    pass

    return Held


class TensorRTRunner(Runner):
    def __init__(self, engine: trt.ICudaEngine, meta: EngineMeta, manifest: Manifest):
        versions.import_tensorrt()  # the real module, not the stubs' namespace package
        import tensorrt as trt
        from polygraphy import cuda
        from polygraphy.backend.trt import TrtRunner
        from polygraphy.datatype import DataType

        self.cuda, self.DataType = cuda, DataType
        self.meta, self.manifest = meta, manifest
        self.engine: trt.ICudaEngine | None = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        cfg, spec = manifest.config, manifest.spec
        self.past = graph.past_names(spec, cfg.num_layers)
        self.to_past = graph.present_to_past(spec, cfg.num_layers)
        missing = [n for n in [graph.INPUT_IDS, *self.past] if n not in self.inputs]
        missing += [n for n in [graph.LOGITS, *self.to_past] if n not in self.outputs]
        if missing:
            raise SamoutError(f"the engine lacks tensors export.json names ({', '.join(missing)}); rebuild it")
        types = {n: engine.get_tensor_dtype(n).name for n in names}
        odd = [f"{n} ({t})" for n, t in types.items() if t not in NUMPY_TYPES]
        if odd:
            raise SamoutError(f"the engine exchanges tensors of types samout-edge does not: {', '.join(odd)}")
        self.numpy_types = {n: np.dtype(NUMPY_TYPES[t]) for n, t in types.items()}
        self.state_dtype = STATE_DTYPES[self.numpy_types[self.past[0]].name]
        self.ranges = profile_ranges(meta, spec)
        self.pool = _Pool()
        self.last_nbytes: dict[str, int] = {}
        self.grew: dict[str, bool] = {}
        self.empty: Any = None
        self._runner: Any = TrtRunner(engine, optimization_profile=0)
        try:
            self._runner.activate()  # creates the execution context and the stream
            if not isinstance(getattr(getattr(self._runner, "output_allocator", None), "buffers", None), dict):
                raise SamoutError("this Polygraphy's TrtRunner has no output allocator buffers to take over; "
                                  "pip install 'polygraphy>=0.49'")
            self.empty = cuda.DeviceArray.raw((256,))  # where a zero-length past points: TensorRT wants an address
        except BaseException:
            self.close()
            raise
        self.active = 0
        longest = max(r.seq[1] for r in self.ranges)
        context = max(r.past[1] + r.seq[1] for r in self.ranges if r.past) if spec.grows else None
        self.info = RunnerInfo("tensorrt", meta.profile, spec, meta.precision, manifest.logits,
                               min(manifest.max_seq, longest), cfg, max_batch=min(r.batch[1] for r in self.ranges),
                               max_context=context, computes_fp16=True, memory=None)  # no readable allocator peak

    # -- values

    def _hold(self, array: Any, shape: tuple[int, ...], numpy_type: np.dtype, key: str | None) -> Any:
        release = (lambda a, k=key: self.pool.give(k, a)) if key is not None else None
        return _held_type()(array, shape, self.DataType.from_dtype(numpy_type), release)

    def initial_state(self, batch: int) -> State:
        self._check_open()
        state = {}
        for name, host in graph.empty_state(self.manifest.config, self.manifest.spec, batch, self.state_dtype).items():
            if host.size == 0:  # a cache of no tokens: a zero-length tensor pointing at a real (unused) buffer
                state[name] = self._hold(self.empty, host.shape, self.numpy_types[name], None)
                continue
            host = np.ascontiguousarray(host)
            array = self.pool.take(name) or self.cuda.DeviceArray.raw((host.nbytes,))
            array.resize((host.nbytes,))
            array.copy_from(host.view(np.uint8).reshape(-1))
            state[name] = self._hold(array, host.shape, host.dtype, name)
        return state

    def _lend(self, name: str) -> None:
        """Put a pooled buffer where TrtRunner's allocator looks, grown ahead for a growing output."""
        array = self.pool.take(name)
        if array is None:
            return
        need = self.last_nbytes.get(name, 0)
        if self.grew.get(name) and array.allocated_nbytes < need + need // 8:
            array.resize((2 * need,))  # a KV cache grows a token per step: reallocate rarely
        self._runner.output_allocator.buffers[name] = array

    def run_impl(self, input_ids: np.ndarray, state: State) -> tuple[Any, State]:
        self._check_open()
        ids = np.ascontiguousarray(np.asarray(input_ids), dtype=self.numpy_types[graph.INPUT_IDS])
        batch, seq = ids.shape
        past = past_length(self.info, state)
        chosen = select_profile(self.ranges, batch, seq, past)
        feeds: dict[str, Any] = {graph.INPUT_IDS: ids, **{n: state[n] for n in self.past}}
        if chosen.index != self.active:
            self._runner.set_profile(chosen.index)
            self.active = chosen.index
            for name, value in feeds.items():  # shapes belong to a profile: set them again
                if not self._runner.context.set_input_shape(name, tuple(value.shape)):
                    raise SamoutError(f"TensorRT refused shape {tuple(value.shape)} for {name} in the {chosen.name} profile")
        allocator = self._runner.output_allocator.buffers
        for name in self.outputs:
            self._lend(name)
        from polygraphy.exception import PolygraphyException

        try:
            views = self._runner.infer(feeds, check_inputs=False, copy_outputs_to_host=False)
        except PolygraphyException as e:
            raise SamoutError(f"TensorRT failed to run the engine: {e}") from None
        values = {}
        for name in self.outputs:
            array, view = allocator.pop(name), views[name]
            shape = tuple(int(d) for d in view.shape)
            nbytes = int(np.prod(shape)) * self.numpy_types[name].itemsize
            self.grew[name] = name in self.last_nbytes and nbytes > self.last_nbytes[name]
            self.last_nbytes[name] = nbytes
            values[name] = self._hold(array, shape, self.numpy_types[name], name)
        new_state = {self.to_past[k]: v for k, v in values.items() if k in self.to_past}
        return values[graph.LOGITS], new_state

    def host_state(self, state: State) -> dict[str, np.ndarray]:
        return {name: self.to_numpy(value).astype(self.numpy_types[name]) for name, value in state.items()}

    def to_numpy(self, value: Any) -> np.ndarray:
        if isinstance(value, self.cuda.DeviceView):
            host = np.asarray(value.numpy())
            return host.astype(np.float32) if host.dtype.kind == "f" else host
        return np.asarray(value)

    def synchronize(self) -> None:
        if self._runner is not None:
            self._runner.stream.synchronize()

    # -- lifecycle

    def _check_open(self) -> None:
        if self._runner is None:
            raise SamoutError("this TensorRT runner is closed")

    def close(self) -> None:
        """Free the context, stream and every buffer the runner holds; values still
        referenced free their own buffers when dropped."""
        runner, self._runner = getattr(self, "_runner", None), None
        if runner is not None:
            leftover = getattr(getattr(runner, "output_allocator", None), "buffers", {}) or {}
            for array in list(leftover.values()):
                array.free()
            leftover.clear()
            if getattr(runner, "is_active", False):
                runner.deactivate()  # frees its input buffers, stream and the execution context
        if hasattr(self, "pool"):
            self.pool.close()
        if getattr(self, "empty", None) is not None:
            self.empty.free()
            self.empty = None
        self.engine = None


def load_trt_runner(path: str | Path, profile: str | None = None) -> TensorRTRunner:
    """The engine for ``profile`` in an export directory (or an engine directory),
    checked against this machine before it is deserialized."""
    export_dir, engine_dir = resolve_engine(path, profile)
    meta = read_engine_meta(engine_dir)
    versions.import_tensorrt()  # the real module, not the stubs' namespace package
    import tensorrt as trt

    from samout_edge.tensorrt.driver import gpu_identity

    identity = gpu_identity()
    check_compatible(meta, str(trt.__version__), identity.gpu, identity.compute_capability,
                     sha256_file(export_dir / MODEL_FILE), export_dir)
    manifest = read_manifest(export_dir)
    if meta.plugins:
        from samout_edge.tensorrt.plugin import plugin_kind, register_plugins

        if plugin_kind(trt.__version__) == "jit":  # an AOT kernel is in the engine; JIT calls back into Python
            register_plugins(meta.plugins, trt.__version__)
    try:
        from polygraphy.backend.trt import EngineFromPath
        from polygraphy.exception import PolygraphyException
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise SamoutError(f"running TensorRT engines uses Polygraphy: {install_hint('tensorrt')}") from None
    try:
        with G_LOGGER.verbosity(G_LOGGER.ERROR):
            engine = EngineFromPath(str(engine_dir / ENGINE_FILE))()
    except PolygraphyException:
        raise SamoutError(f"TensorRT could not deserialize {engine_dir / ENGINE_FILE}; "
                          f"rebuild it: samout-edge build {export_dir} --profile {meta.profile}") from None
    return TensorRTRunner(engine, meta, manifest)


@dataclass(frozen=True)
class TensorRTOptions(BackendOptions):
    engine: str | None = option(None, "The TensorRT engine built for this profile (EXPORT/engines/PROFILE; default: "
                                "the only one).")


def _load(directory: Path, options: TensorRTOptions) -> TensorRTRunner:
    return load_trt_runner(directory, profile=options.engine or None)


BACKEND = Backend("tensorrt", TensorRTOptions, _load, "a TensorRT engine built from the export (--engine PROFILE)",
                  versions.CAPABILITIES)
