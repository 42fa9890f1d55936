"""What keeps a lowered scan honest: the sites verify checks, and the length guard.

An unrolled scan is right up to the length it was unrolled for (lowering.py).
The exporter records where each scan sits in the graph (its inputs, output, axis
and which scan), so verify cuts the graph's own nodes out and checks them against
the scan's definition (scans.py): bit for bit for max, at a stated tolerance for
the linear recurrence. Past max_seq the guard turns every output into NaN.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from samout_edge import scans as sc
from samout_edge.lowering import GraphBuilder, node_axis, outer_inputs, scan_nodes


@dataclass(frozen=True)
class ScanSite:
    """Where one scan sits in a graph: its input tensors (one per element tensor), its output,
    its axis and which scan (scans.py). The sites are recorded in the graph's metadata
    (SITES_KEY), so verify can cut each scan out of the exported graph and check the graph's
    own nodes, not a fresh copy of the op."""

    x: tuple[str, ...]
    y: str
    axis: int
    scan: str = "max"

    def to_json(self) -> list:
        """A max site as it was always recorded, ``[x, y, axis]``; others ``[[x...], y, axis, scan]``."""
        return [self.x[0], self.y, self.axis] if self.scan == "max" else [list(self.x), self.y, self.axis, self.scan]

    @classmethod
    def from_json(cls, row: list) -> ScanSite:
        if len(row) == 3:
            x, y, axis = row
            return cls((str(x),), str(y), int(axis))
        x, y, axis, scan = row
        if not isinstance(x, list) or len(x) != sc.scan(scan).arity:
            raise ValueError(f"a {scan} scan site has {sc.scan(scan).arity} inputs, not {x!r}")
        return cls(tuple(str(n) for n in x), str(y), int(axis), str(scan))


SITES_KEY = "samout_edge.scan_sites"


def scan_sites(model: onnx.ModelProto) -> list[ScanSite]:
    """The placeholder (or custom) scan nodes' sites, in graph order."""
    return [ScanSite(tuple(n.input), n.output[0], node_axis(n), sc.BY_OP[n.op_type].name) for n in scan_nodes(model)]


def record_sites(model: onnx.ModelProto, sites: list[ScanSite]) -> None:
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                   SITES_KEY: json.dumps([s.to_json() for s in sites])})


def read_sites(model: onnx.ModelProto) -> list[ScanSite] | None:
    """The recorded sites, or None for a graph exported before they were recorded."""
    for prop in model.metadata_props:
        if prop.key == SITES_KEY:
            try:
                return [ScanSite.from_json(row) for row in json.loads(prop.value)]
            except (ValueError, TypeError) as e:
                raise ValueError(f"the graph's {SITES_KEY} metadata is malformed ({e})") from None
    return None


def scan_model(model: onnx.ModelProto, site: ScanSite) -> onnx.ModelProto:
    """The nodes of ``model`` that compute ``site.y`` from ``site.x``, as a model of their own
    (inputs ``site.x``, output ``y``; the model's local functions and opsets kept). Fails if they
    read anything else than ``site.x``, constants and initializers: then they are not one scan."""
    g = model.graph
    producers = {out: node for node in g.node for out in node.output}
    initializers = {i.name: i for i in g.initializer}
    needed: set[int] = set()
    used_initializers: set[str] = set()
    stack, seen = [site.y], set()
    while stack:
        name = stack.pop()
        if not name or name in site.x or name in seen:
            continue
        seen.add(name)
        if name in initializers:
            used_initializers.add(name)
            continue
        node = producers.get(name)
        if node is None:
            raise ValueError(f"the scan {', '.join(site.x)} -> {site.y} reads {name!r}, which it does not compute")
        needed.add(id(node))
        stack += list(node.input) + outer_inputs(node)
    nodes = [n for n in g.node if id(n) in needed]
    elem = next((v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.output) if v.name == site.y), None)
    if elem is None:
        elem = g.input[1].type.tensor_type.elem_type if len(g.input) > 1 else onnx.TensorProto.FLOAT
    dims = ["b", "h", "s", "d"]
    sub = helper.make_graph(nodes, "scan", [helper.make_tensor_value_info(x, elem, dims) for x in site.x],
                            [helper.make_tensor_value_info(site.y, elem, dims)],
                            [initializers[n] for n in sorted(used_initializers)])
    return helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                             functions=list(model.functions))


def guard_length(model: onnx.ModelProto, input_name: str, axis: int, max_len: int, outputs: list[str],
                 elem_type: int, state_inputs: list[str] = ()) -> onnx.ModelProto:
    """Make ``outputs`` NaN when ``input_name``'s ``axis`` is longer than ``max_len``,
    or when a ``state_inputs`` row holds a NaN or an infinity.

    An unrolled scan is wrong past the length it was unrolled for, and a wrong
    finite answer is the worst kind; a NaN is loud in every runtime. It must also
    stay loud through the state into every later call, and a running max does not
    carry it everywhere: OpenVINO's (and CUDA's fmax's) Max(NaN, x) is x. So the
    incoming state is checked here too, with arithmetic that propagates NaN in
    every runtime: per batch row, ReduceSum(state * 0) is 0 for a finite state
    and NaN otherwise. Rows are poisoned one by one (a batch of sessions keeps its
    healthy rows). The exporter passes every state a scan carries: a linear
    recurrence's h would propagate NaN by itself, but the heads' running max
    after it might drop it. A few tiny nodes per graph.
    """
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    g = GraphBuilder("length_guard", opset)
    shape = g.op("Shape", [input_name])
    length = g.op("Slice", [shape, g.const([axis]), g.const([axis + 1])])
    too_long = g.op("Greater", [length, g.const([max_len])])
    np_type = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    poison = g.op("Where", [too_long, g.const([np.nan], np_type), g.const([0.0], np_type)])  # [1]
    if state_inputs:
        zero = g.const([0.0], np_type)
        rows = [g.op("ReduceSum", [g.op("Mul", [name, zero]), g.const([1, 2, 3])], keepdims=1) for name in state_inputs]
        total = rows[0] if len(rows) == 1 else g.op("Sum", rows)  # [batch, 1, 1, 1]: 0, or NaN for a bad row
        poison = g.op("Add", [total, poison])
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in model.graph.output}
    by_rank: dict[int, str] = {}

    def poison_for(rank: int) -> str:
        """The poison shaped to broadcast over an output of ``rank`` dims, batch first."""
        if not state_inputs:
            return poison
        if rank not in by_rank:
            by_rank[rank] = poison if rank == 4 else g.op("Reshape", [poison, g.const([-1] + [1] * (rank - 1))])
        return by_rank[rank]

    producers = {out: node for node in model.graph.node for out in node.output}
    for name in outputs:
        unguarded = f"{name}_unguarded"
        node = producers[name]
        node.output[list(node.output).index(name)] = unguarded
        for consumer in model.graph.node:  # the graph may read the output internally too
            for i, inp in enumerate(consumer.input):
                if inp == name:
                    consumer.input[i] = unguarded
        g.op("Add", [unguarded, poison_for(ranks[name])], outputs=[name])
    model.graph.node.extend(g.nodes)
    return model
