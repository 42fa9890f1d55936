"""The exported graph's contract: I/O names, dtypes, the empty state, the CumMax op.

One graph serves prefill and decode. Inputs: ``input_ids`` int64 ``[batch, seq]``
and per layer the past state; outputs: ``logits`` and the present state, which
the next call takes as its past. Every runner passes state as a dict keyed by
the graph's *input* names, so the state one call returns feeds the next call
unchanged, whatever the backend.

The state's names, shapes, growth axis and empty value come from the arch's spec
(artifact/arch.py), which every helper here takes decoded (an ``ArchSpec``, never
a name): a running max ``past_max.{i}`` ``[batch, heads, 1, head_dim]`` whose
empty value is the dtype's lowest finite value, or a KV cache
``past_key_values.{i}.key|value`` ``[batch, heads, past_seq, head_dim]`` as Optimum
names them (past_seq may be 0), growing on ``arch.SEQ_AXIS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from samout_edge.artifact.arch import ArchSpec
from samout_edge.artifact.config import ModelConfig

# Tokens per prefill call by default: bounded working memory. Half llama.cpp's 512: on the CPU it holds
# half the activations (21.5 vs 43.8 MiB above the seed int4 model at 1k tokens) in the same time
# (benchmarks/results/cpu-ubatch-256.md).
PREFILL_UBATCH = 256

INPUT_IDS = "input_ids"
LOGITS = "logits"

# The CumMax op's identity, shared by the exporter, the lowering, the lint and the
# TensorRT plugin: op type, domain (also the plugin's namespace) and version.
CUMMAX_DOMAIN = "samout_edge"
CUMMAX_OP = "CumMax"
CUMMAX_VERSION = 1
CUMMAX_PLUGIN_ID = f"{CUMMAX_DOMAIN}::{CUMMAX_OP}"
LINEAR_SCAN_OP = "LinearScan"  # the linear recurrence's op, same domain and version (scans.py)


@dataclass(frozen=True)
class DType:
    """One float type as every layer names it (ONNX element types as plain ints, so
    this module needs neither onnx nor torch)."""

    name: str  # fp32 | fp16 | bf16: what users type
    numpy: str  # numpy's and torch's attribute name
    onnx: int  # onnx.TensorProto element type
    itemsize: int


DTYPES: dict[str, DType] = {
    "fp32": DType("fp32", "float32", 1, 4),
    "fp16": DType("fp16", "float16", 10, 2),
    "bf16": DType("bf16", "bfloat16", 16, 2),  # the kernels and plugin take it; exports do not
}
EXPORT_DTYPES = ("fp32", "fp16")
ONNX_TYPE_NAMES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool", 11: "float64"}


def dtype(name: str) -> DType:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def numpy_dtype(name: str) -> np.dtype:
    if name == "bf16":
        raise ValueError("numpy has no bfloat16")
    return np.dtype(dtype(name).numpy)


@dataclass
class TensorSpec:
    name: str
    dtype: str  # "int64" | "float32" | "float16"
    shape: list[int | str]  # ints are fixed, strings name a dynamic dimension


def past_names(spec: ArchSpec, num_layers: int) -> list[str]:
    return spec.past_names(num_layers)


def present_names(spec: ArchSpec, num_layers: int) -> list[str]:
    return spec.present_names(num_layers)


def present_to_past(spec: ArchSpec, num_layers: int) -> dict[str, str]:
    return dict(zip(spec.present_names(num_layers), spec.past_names(num_layers)))


def graph_io(config: ModelConfig, spec: ArchSpec, dtype_name: str, logits: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Names, dtypes and shapes of the graph's inputs and outputs (strings name dynamic dims)."""
    h, d = config.num_heads, config.head_dim
    float_type = dtype(dtype_name).numpy
    states = spec.states(config.num_layers)
    inputs = [TensorSpec(INPUT_IDS, "int64", ["batch", "seq"])]
    inputs += [TensorSpec(t.past, float_type, t.shape("batch", h, d, "past_seq")) for t in states]
    outputs = [TensorSpec(LOGITS, float_type, ["batch", "seq" if logits == "all" else 1, config.vocab_size])]
    outputs += [TensorSpec(t.present, float_type, t.shape("batch", h, d, "total_seq")) for t in states]
    return inputs, outputs


def empty_state(config: ModelConfig, spec: ArchSpec, batch: int, dtype_name: str) -> dict[str, np.ndarray]:
    """The state before any token, as numpy arrays keyed by graph input name (the spec's rule,
    ArchSpec.empty_state, at a dtype named as users name it)."""
    return spec.empty_state(config.num_layers, batch, config.num_heads, config.head_dim, numpy_dtype(dtype_name))


def state_bytes(config: ModelConfig, spec: ArchSpec, batch: int, context: int, dtype_name: str) -> int:
    """Bytes of the decode state after ``context`` tokens: constant for a running max, linear for a KV cache."""
    return spec.state_bytes(config.num_layers, config.num_heads, config.head_dim, batch, context,
                            dtype(dtype_name).itemsize)


def flatten(spec: ArchSpec, layer_states: list) -> list:
    """Per-layer states (a tensor, or a tuple of them) -> the flat list in graph order."""
    return spec.flatten(layer_states)


def unflatten(spec: ArchSpec, flat: list) -> list:
    return spec.unflatten(flat)
