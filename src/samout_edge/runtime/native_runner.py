"""The native backend: SamOut's cummax forward pass in C (native/samout.c), no runtime under it.

ONNX Runtime costs a process about 30 MB before the model (its library's pages and its
operator schemas: docs/benchmarking.md), which is most of what separates our int4 process
from llama.cpp's at short contexts. This backend computes the same function from the
export's ``native.safetensors`` (``export --native``): the weights the graph holds, mapped
read-only, and a forward pass of about 250 lines of C built on the machine that runs it.
verify checks it against the golden outputs like every backend; max_seq does not bound it
(a running max over chunks is exact at any length).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samout_edge.artifact import graph
from samout_edge.artifact.capabilities import Capabilities, Requirement
from samout_edge.artifact.manifest import Manifest, read_manifest
from samout_edge.errors import SamoutError
from samout_edge.native import build
from samout_edge.native.weights import FILE, MATRICES, PANEL, Q4_BLOCK, NativeWeights, unsupported
from samout_edge.runtime.backend import Backend, BackendOptions, option
from samout_edge.runtime.base import Runner, RunnerInfo, State

LAYER_NORM_EPS = 1e-5  # models/model.py LayerNorm: torch's default

_f32 = ctypes.POINTER(ctypes.c_float)
_u8 = ctypes.POINTER(ctypes.c_uint8)
_i8 = ctypes.POINTER(ctypes.c_int8)


class _Mat(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int32), ("k", ctypes.c_int32), ("f", _f32), ("q", _u8), ("s", _f32), ("z", _u8)]


class _Layer(ctypes.Structure):
    _fields_ = [("combined", _Mat), ("ffn1", _Mat), ("gate", _Mat), ("ffn2", _Mat), ("b1", _f32), ("bg", _f32),
                ("b2", _f32), ("ln_w", _f32), ("ln_b", _f32), ("alpha", ctypes.c_float), ("eps", ctypes.c_float)]


class _Model(ctypes.Structure):
    _fields_ = [("vocab", ctypes.c_int32), ("hidden", ctypes.c_int32), ("heads", ctypes.c_int32),
                ("layers", ctypes.c_int32), ("em_block", ctypes.c_int32), ("em_f", _f32), ("em_q", _i8),
                ("em_s", _f32), ("em_z", _i8), ("layer", ctypes.POINTER(_Layer)), ("head", _Mat)]


def _ptr(a: np.ndarray | None, kind):
    return ctypes.cast(a.ctypes.data, kind) if a is not None else ctypes.cast(None, kind)


class NativeRunner(Runner):
    def __init__(self, weights: NativeWeights, manifest: Manifest, lib: ctypes.CDLL, threads: int):
        self.weights, self.manifest, self.lib, self.threads = weights, manifest, lib, threads
        c = manifest.config
        self.model = self._model(weights, c)
        self.names = [t.past for t in manifest.spec.states(c.num_layers)]
        self.info = RunnerInfo("native", f"cpu ({build.kernels()}, {threads} thread{'s' if threads > 1 else ''})", manifest.spec, "fp32", manifest.logits, None, c)

    def _matrix(self, w: NativeWeights, name: str, rows: int, cols: int) -> _Mat:
        panels, blocks = -(-rows // PANEL), cols // Q4_BLOCK
        if name + ".panels" in w.tensors:
            return _Mat(rows, cols, _ptr(w.get(name + ".panels", (panels, cols, PANEL)), _f32), _ptr(None, _u8),
                        _ptr(None, _f32), _ptr(None, _u8))
        zero = w.tensors.get(name + ".zero_points")
        if zero is not None:
            zero = w.get(name + ".zero_points", (panels, blocks, PANEL))
        return _Mat(rows, cols, _ptr(None, _f32), _ptr(w.get(name + ".q4", (panels, blocks, 16, PANEL)), _u8),
                    _ptr(w.get(name + ".scales", (panels, blocks, PANEL)), _f32), _ptr(zero, _u8))

    def _model(self, w: NativeWeights, c) -> _Model:
        h = c.hidden_size
        layers = (_Layer * c.num_layers)()
        for i in range(c.num_layers):
            p = f"decoder_layers.{i}."
            mats = [self._matrix(w, f"{p}{m}.weight", 3 * h if m.endswith("combined") else h, h) for m in MATRICES]
            vectors = [_ptr(w.get(f"{p}{v}", (h,)), _f32) for v in
                       ("ffn.ffn1.bias", "ffn.gate.bias", "ffn.ffn2.bias", "layer_norm.weight", "layer_norm.bias")]
            alpha = float(w.get(f"{p}alpha", ()))
            layers[i] = _Layer(*mats, *vectors, alpha, LAYER_NORM_EPS)
        self._layers = layers  # the C struct points into it
        if "em.weight" in w.tensors:
            em = (_ptr(w.get("em.weight", (c.vocab_size, h)), _f32), _ptr(None, _i8), _ptr(None, _f32), _ptr(None, _i8))
            block = h
        else:
            block = int(w.metadata.get("em.weight.block", "0"))
            if block < 1:
                raise SamoutError("the native weights' embedding has no block size: export again with --native")
            blocks = -(-h // block)
            zero = w.tensors.get("em.weight.zero_points")
            em = (_ptr(None, _f32), _ptr(w.get("em.weight.q8", (c.vocab_size, h)), _i8),
                  _ptr(w.get("em.weight.scales", (c.vocab_size, blocks)), _f32),
                  _ptr(None if zero is None else w.get("em.weight.zero_points", (c.vocab_size, blocks)), _i8))
        head = self._matrix(w, "head.weight", c.vocab_size, h)
        return _Model(c.vocab_size, h, c.num_heads, c.num_layers, block, *em, layers, head)

    def initial_state(self, batch: int) -> State:
        return graph.empty_state(self.manifest.config, self.manifest.spec, batch, "fp32")

    def run_impl(self, input_ids, state: State):
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        c = self.manifest.config
        if ids.min() < 0 or ids.max() >= c.vocab_size:
            raise SamoutError(f"input_ids must be in [0, {c.vocab_size}), got {int(ids.min())}..{int(ids.max())}")
        batch, seq = ids.shape
        # [layers, batch, heads, 1, head_dim] -> per batch row [layers, hidden], the C side's layout
        running = np.stack([np.asarray(state[n], dtype=np.float32) for n in self.names], axis=1)
        running = np.ascontiguousarray(running.reshape(batch, c.num_layers, c.hidden_size))
        rows = seq if self.manifest.logits == "all" else 1
        logits = np.empty((batch, rows, c.vocab_size), np.float32)
        for b in range(batch):
            done = self.lib.samout_forward(ctypes.byref(self.model), seq, ids[b].ctypes.data_as(ctypes.c_void_p),
                                           running[b].ctypes.data_as(ctypes.c_void_p), int(rows > 1),
                                           logits[b].ctypes.data_as(ctypes.c_void_p), self.threads)
            if done != 0:
                raise SamoutError(f"the native forward pass ran out of memory on a call of {seq:,} tokens")
        shape = (batch, c.num_heads, 1, c.head_dim)
        return logits, {n: running[:, i].reshape(shape).copy() for i, n in enumerate(self.names)}

    def close(self) -> None:
        self.model = self._layers = self.weights = None


def load_native_runner(directory: str | Path, threads: int | None = None) -> NativeRunner:
    """``threads``: threads one call's matrix products use (None: $OMP_NUM_THREADS, OpenMP's own
    variable, else one per core this process may run on). More threads than free cores is slow:
    each product ends at a barrier that waits for a thread the OS has not scheduled."""
    manifest = read_manifest(directory)
    why = unsupported(manifest.spec, manifest.dtype, manifest.weights, manifest.config.hidden_size)
    if why is not None:
        raise SamoutError(f"the native backend cannot run {directory}: {why}; run it on ort")
    weights = NativeWeights(Path(directory) / FILE)
    if threads is None:
        given = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
        if given.isdigit() and int(given) > 0:
            threads = int(given)
        else:
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads < 1:
        raise SamoutError(f"threads must be at least 1, got {threads}")
    return NativeRunner(weights, manifest, build.library(), threads)


@dataclass(frozen=True)
class NativeOptions(BackendOptions):
    intra_op_threads: int | None = option(None, "Threads one call uses (None: one per core).", cli=False)


def _load(directory: Path, options: NativeOptions) -> NativeRunner:
    return load_native_runner(directory, options.intra_op_threads)


BACKEND = Backend(
    "native", NativeOptions, _load, "SamOut's cummax forward pass in C, built here (export --native)",
    Capabilities("the native backend", dtypes=("fp32",), zero_points=True, growing_state=False, mixers=("cummax",),
                 needs_file=(FILE, "export --native writes it"),
                 requires=(Requirement("", "a C compiler (cc, or the one $CC names)", "apt install gcc", program="cc",
                                       env="CC"),)),
)
