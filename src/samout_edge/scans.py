"""The scans a mixer runs over the sequence: each one is its combine and its identity.

A scan element is a tuple of tensors (one for max, two for the linear recurrence);
``combine(ops, earlier, later)`` joins two adjacent elements and is associative, so
every lowering in lowering.py (sequential, doubling, blocked, the decode shortcut,
the custom op's function body) is written once over it. ``ops`` is numpy here
(NUMPY_OPS) and ONNX nodes in lowering.py: the same combine builds both.

- ``max``: ``y_t = max(y_{t-1}, x_t)``, identity -inf; exact in every dtype.
- ``linear``: ``h_t = a_t * h_{t-1} + b_t`` as pairs ``(a, b) o (a', b') = (a a', a' b + b')``,
  identity ``(1, 0)``; the op returns the ``b`` part, ``h`` (from ``h_{-1} = 0``).
  Rounded differently by each scan order, so checked at ``tolerance`` against a
  float64 loop of the recurrence (``reference``).

Each scan is one ONNX op in the ``samout_edge`` domain (CumMax, LinearScan), so a
TensorRT plugin is found by op type, and each op carries its own function body.
Imports neither torch nor onnx: the device side checks scans with numpy alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from samout_edge.artifact.graph import CUMMAX_OP, LINEAR_SCAN_OP

Element = tuple[Any, ...]
Combine = Callable[[Any, Element, Element], Element]


def max_combine(ops, earlier: Element, later: Element) -> Element:
    return (ops.max(earlier[0], later[0]),)


def linear_combine(ops, earlier: Element, later: Element) -> Element:
    """(a, b) then (a', b'): h -> a' (a h + b) + b' = (a a') h + (a' b + b')."""
    (a, b), (a2, b2) = earlier, later
    return ops.mul(a, a2), ops.add(ops.mul(a2, b), b2)


def _running_max(inputs: Sequence[np.ndarray], axis: int) -> np.ndarray:
    """In the input's dtype: max is exact, NaN propagating as torch.cummax does."""
    return np.maximum.accumulate(inputs[0], axis=axis)


def _recurrence(inputs: Sequence[np.ndarray], axis: int) -> np.ndarray:
    """h_t = a_t * h_{t-1} + b_t from h_{-1} = 0, one step at a time in float64."""
    a, b = (np.moveaxis(np.asarray(t, np.float64), axis, 0) for t in inputs)
    h, out = np.zeros_like(b[0]), np.empty_like(b)
    for t in range(len(b)):
        h = a[t] * h + b[t]
        out[t] = h
    return np.moveaxis(out, 0, axis)


def _normal(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> tuple[np.ndarray, ...]:
    return (rng.standard_normal(shape).astype(dtype),)


def _decays_and_inputs(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> tuple[np.ndarray, ...]:
    """Decays as the linear mixer makes them, sigmoid of a normal (some near 1: long memory), and inputs."""
    a = 1.0 / (1.0 + np.exp(-2.0 * rng.standard_normal(shape)))
    return a.astype(dtype), rng.standard_normal(shape).astype(dtype)


@dataclass(frozen=True)
class Scan:
    name: str
    op_type: str  # the ONNX op in the samout_edge domain (and a TensorRT plugin's name)
    torch_op: str  # the torch custom op ``samout_edge::<torch_op>`` (models/ops.py) the exporter translates to op_type
    inputs: tuple[str, ...]  # the element's tensors, as the op and its function body name them
    output: int  # which of the element's tensors the op returns
    combine: Combine
    identity: tuple[float, ...]  # per tensor: what pads a scan and fills a shift
    reference: Callable[[Sequence[np.ndarray], int], np.ndarray]  # the definition, one step at a time (float64)
    sample: Callable[[np.random.Generator, tuple[int, ...], Any], tuple[np.ndarray, ...]]  # verify's inputs
    tolerance: dict[str, float] = field(default_factory=dict)  # dtype -> error bound relative to max(1, |h|); {}: exact
    doc: str = ""

    @property
    def arity(self) -> int:
        return len(self.inputs)

    @property
    def exact(self) -> bool:
        return not self.tolerance


NUMPY_OPS = SimpleNamespace(max=np.maximum, mul=np.multiply, add=np.add)

# linear: verify's bound on the error relative to max(1, |h|) against the float64 loop. Measured (2026-12-05,
# ONNX Runtime 1.32 CPU and onnx.reference, which computes fp16 in fp16; doubling and blocked scans, every length
# 1..300 and up to 4096): with verify's inputs (decays sigmoid(2 N(0,1)), inputs N(0,1)) fp32 1.9e-7, fp16 1.2e-3;
# with long memory (decays 1 - 10^U(-4,-1)) fp32 3.1e-7, fp16 2.5e-3 (onnx.reference). The bounds: 6x and 4x that.
SCANS: dict[str, Scan] = {
    "max": Scan("max", CUMMAX_OP, "cummax", ("x",), 0, max_combine, (-np.inf,), _running_max, _normal,
                doc="Running maximum along `axis`: the values of torch.cummax(x, axis)."),
    "linear": Scan("linear", LINEAR_SCAN_OP, "linear_scan", ("a", "b"), 1, linear_combine, (1.0, 0.0), _recurrence,
                   _decays_and_inputs, {"fp32": 2e-6, "fp16": 1e-2},
                   doc="First-order linear recurrence along `axis`: h_t = a_t * h_{t-1} + b_t, h_{-1} = 0."),
}
BY_OP = {scan.op_type: scan for scan in SCANS.values()}


def scan(name: str) -> Scan:
    try:
        return SCANS[name]
    except KeyError:
        raise ValueError(f"unknown scan {name!r}; choose one of {', '.join(SCANS)}") from None


def combine_scan(s: Scan, inputs: Sequence[np.ndarray], axis: int) -> np.ndarray:
    """The scan by its combine, one element at a time (the definition a lowering must agree with)."""
    parts = [np.moveaxis(np.asarray(t), axis, 0) for t in inputs]
    running = tuple(p[0] for p in parts)
    out = [running[s.output]]
    for t in range(1, len(parts[0])):
        running = s.combine(NUMPY_OPS, running, tuple(p[t] for p in parts))
        out.append(running[s.output])
    return np.moveaxis(np.stack(out), 0, axis)
