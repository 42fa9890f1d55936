"""Scans in ONNX: there is no CumMax or linear-recurrence op, so we build them.

A scan (scans.py) is its combine and its identity; everything here is written
once over them. The exporter first emits one placeholder node per scan,
``samout_edge::CumMax`` (x) or ``samout_edge::LinearScan`` (a, b), attribute
``axis``. This module then makes it real, one of two ways:

- ``native``: the node is replaced by standard ONNX ops (runs on every runtime
  and every TensorRT).
- ``custom``: the node stays (domain ``samout_edge``, version 1; attributes
  ``axis`` and ``plugin_namespace="samout_edge"``), and the model carries a local
  function of the same name whose body is the native scan. TensorRT with the
  op's plugin runs the plugin; ONNX Runtime and TensorRT without it run the body.

A scan along a dynamic axis must be unrolled for the longest length it will ever
see: ``max_len``. The number of steps comes from ``max_len``, never from the
length used for tracing. Scans (max is exact in all of them; the linear one
rounds in its own order, scans.py states by how much):

- ``doubling``: log-step (Hillis-Steele) scan, ceil(log2(max_len)) passes of
  shift+combine over the whole tensor, the shift filled with the identity.
- ``blocked``: split the axis into blocks of ``block``; a sequential scan inside
  each block (about one pass), a doubling scan over the block totals (1/block of
  the data), then one broadcast combine: about four passes in all.
- a static axis (the head axis) is scanned sequentially, ``len - 1`` combines.
- a dynamic axis of length 1 (a decode step) takes an ``If`` around the scan.

Every scan flattens its inputs to ``[P, L, Q]`` around the scan axis, so one body
serves any axis and rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from samout_edge import scans as sc
from samout_edge.artifact.graph import CUMMAX_DOMAIN as DOMAIN
from samout_edge.artifact.graph import CUMMAX_OP as OP_TYPE
from samout_edge.artifact.graph import CUMMAX_VERSION as OP_VERSION
from samout_edge.artifact.graph import dtype as graph_dtype
from samout_edge.scans import Scan

SCANS = ("blocked", "doubling")
LOWERINGS = ("native", "custom")
DEFAULT_BLOCK = 16
# A static axis up to this long is scanned sequentially (Split + Max chain + Concat).
MAX_SEQUENTIAL_LEN = 64
INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class ScanPlan:
    """How one scan is written in ONNX ops, and the longest axis it is correct for."""

    scan: str  # "blocked" | "doubling"
    max_len: int
    block: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        if self.scan not in SCANS:
            raise ValueError(f"unknown scan {self.scan!r}; choose one of {SCANS}")
        if self.max_len < 1 or self.block < 2:
            raise ValueError("max_len must be >= 1 and block >= 2")

    @property
    def passes(self) -> float:
        """Approximate full-tensor passes (reads + writes), for the docs' comparison."""
        if self.scan == "doubling":
            return 3.0 * math.ceil(math.log2(max(self.max_len, 2)))
        blocks = math.ceil(self.max_len / self.block)
        carry = 3.0 * math.ceil(math.log2(blocks)) / self.block if blocks > 1 else 0.0
        return 4.0 + carry + (1.0 if blocks > 1 else 0.0)


# Up to this length the doubling scan's few steps beat the blocked scan's fixed
# node count. `samout-edge bench op --shape 1,8,L,64` on a 2-core EPYC, ONNX Runtime
# 1.32, median ms blocked/doubling: L=8 0.102/0.064, L=32 0.149/0.134,
# L=64 0.191/0.214, L=256 0.77/1.15, L=8192 24.3/113.5.
DOUBLING_UP_TO = 32


def choose_scan(max_len: int, block: int = DEFAULT_BLOCK) -> ScanPlan:
    """The fastest correct scan for an axis of up to ``max_len`` (measured, see above)."""
    if max_len <= DOUBLING_UP_TO:
        return ScanPlan("doubling", max_len, block)
    return ScanPlan("blocked", max_len, block)


class GraphBuilder:
    """Appends ONNX nodes with unique names; constants become Constant nodes.

    Written for the widest TensorRT support: no ReduceProd on shapes (TensorRT 8.x
    reduces only floats), Split sized by an input below opset 18, and Slice axes
    always constant.
    """

    def __init__(self, prefix: str, opset: int = 18):
        self.prefix = prefix
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def const(self, value, dtype=np.int64) -> str:
        out = self.name("const")
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), out)
        self.nodes.append(helper.make_node("Constant", [], [out], name=out, value=tensor))
        return out

    def attribute_int(self, attribute: str) -> str:
        """A scalar int64 tensor holding the enclosing function's int attribute."""
        scalar = self.name(attribute)
        ref = helper.make_attribute_ref("value_int", onnx.AttributeProto.INT, ref_attr_name=attribute)
        node = helper.make_node("Constant", [], [scalar], name=scalar)
        node.attribute.append(ref)
        self.nodes.append(node)
        return scalar

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, **attrs) -> str | list[str]:
        names = [self.name(op_type) for _ in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.name(op_type + "_node"), **attrs))
        return names[0] if len(names) == 1 else names

    def split(self, x: str, axis: int, parts: int) -> list[str]:
        """Equal parts of size 1 along ``axis``."""
        if self.opset >= 18:
            return self.op("Split", [x], outputs=parts, axis=axis, num_outputs=parts)
        return self.op("Split", [x, self.const([1] * parts)], outputs=parts, axis=axis)


class OnnxOps:
    """The ops a combine (scans.py) calls, as ONNX nodes appended to ``g``."""

    def __init__(self, g: GraphBuilder):
        self.g = g

    def max(self, x: str, y: str) -> str:
        return self.g.op("Max", [x, y])

    def mul(self, x: str, y: str) -> str:
        return self.g.op("Mul", [x, y])

    def add(self, x: str, y: str) -> str:
        return self.g.op("Add", [x, y])


def emit_scan(
    g: GraphBuilder,
    s: Scan,
    xs: tuple[str, ...],
    y: str,
    axis: int | None,
    plan: ScanPlan,
    static_len: int | None = None,
    elem_type: int | None = None,
) -> None:
    """Append nodes computing ``y = scan(xs, axis)`` for the scan ``s`` (scans.py).

    ``axis=None`` reads it from the enclosing function's ``axis`` attribute.
    ``static_len`` (the axis length, when every input has the same one) allows
    the cheapest scan, a sequential one with no padding. ``elem_type`` (the ONNX
    dtype of xs) lets the fill constants be typed directly; without it (a function
    body, generic in dtype) CastLike does it, which TensorRT parses from 9.1.
    Nodes whose results ``y`` does not need (the linear scan's running decay
    where only ``h`` is read on) are dropped.
    """
    start = len(g.nodes)
    if static_len is None and axis is not None:  # a dynamic axis: one element (a decode step) is its own scan
        _one_or_scan(g, s, xs, y, axis, plan, elem_type)  # (not in a function's body: onnx.inliner and
    elif static_len is not None and static_len <= MAX_SEQUENTIAL_LEN and axis is not None:  # onnx.reference
        _sequential(g, s, xs, axis, static_len, y)  # mishandle an If there; a plugin or ONNX Runtime run that)
    else:  # on xs themselves: no reshape around it (9 nodes for 8 heads, not 20)
        _scan(g, s, xs, y, axis, plan, elem_type)
    g.nodes[start:] = prune(g.nodes[start:], {y})


def prune(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` less those no path to ``outputs`` needs (in order)."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
            needed.update(outer_inputs(node))
    return kept[::-1]


def _one_or_scan(g: GraphBuilder, s: Scan, xs: tuple[str, ...], y: str, axis: int, plan: ScanPlan,
                 elem_type: int | None) -> None:
    """``If(length == 1, the element's output, scan(xs))``: a decode step runs one If instead of the
    scan's ~70 nodes, whose fixed cost dominated a one-token step on CPUs (the seed preset's decode
    ran 717 nodes; measured in docs/benchmarking.md). A one-element scan is that element (the linear
    scan from h = 0: h = b), so both branches compute the same values and the If is exact."""
    ax, ax_next = _axis_range(g, axis)
    length = g.op("Slice", [g.op("Shape", [xs[0]]), ax, ax_next])
    one = g.op("Squeeze", [g.op("Equal", [length, g.const([1])])])
    branches = {}
    for branch in ("one", "scan"):
        sub = GraphBuilder(f"{g.prefix}/{branch}", g.opset)
        out = sub.name("y")
        if branch == "one":
            sub.op("Identity", [xs[s.output]], outputs=[out])
        else:
            _scan(sub, s, xs, out, axis, plan, elem_type)
            sub.nodes = prune(sub.nodes, {out})
        typed = helper.make_tensor_value_info(out, elem_type or onnx.TensorProto.UNDEFINED, None)
        branches[branch] = helper.make_graph(sub.nodes, sub.prefix.replace("/", "_"), [], [typed])
    g.op("If", [one], outputs=[y], then_branch=branches["one"], else_branch=branches["scan"])


def _axis_range(g: GraphBuilder, axis: int | None) -> tuple[str, str]:
    """[axis] and [axis + 1] as 1-D int64 tensors (from the function's attribute where axis is None)."""
    if axis is not None:
        return g.const([axis]), g.const([axis + 1])
    ax = g.op("Unsqueeze", [g.attribute_int("axis"), g.const([0])])
    return ax, g.op("Add", [ax, g.const([1])])


def _fills(g: GraphBuilder, s: Scan, like: str, elem_type: int | None) -> tuple[str, ...]:
    """The scan's identity, a scalar per tensor: what pads a scan and fills a shift."""
    if elem_type is None:
        return tuple(g.op("CastLike", [g.const(v, np.float32), like]) for v in s.identity)
    return tuple(g.const(v, onnx.helper.tensor_dtype_to_np_dtype(elem_type)) for v in s.identity)


def _scan(g: GraphBuilder, s: Scan, xs: tuple[str, ...], y: str, axis: int | None, plan: ScanPlan,
          elem_type: int | None) -> None:
    """The padded scan over ``[P, L, Q]`` (``plan.scan``): any length up to ``plan.max_len``."""
    ax, ax_next = _axis_range(g, axis)
    flats = []
    for x in xs:
        if axis is not None:
            flats.append(g.op("Flatten", [x], axis=axis))
        else:
            flats.append(g.op("Flatten", [x]))
            g.nodes[-1].attribute.append(helper.make_attribute_ref("axis", onnx.AttributeProto.INT))
    # [P, L, Q] around the scan axis: P, L*Q from the flattened shape, L from x's shape.
    shape = g.op("Shape", [xs[0]])
    length = g.op("Slice", [shape, ax, ax_next])
    flat_shape = g.op("Shape", [flats[0]])
    outer = g.op("Slice", [flat_shape, g.const([0]), g.const([1])])
    inner = g.op("Div", [g.op("Slice", [flat_shape, g.const([1]), g.const([2])]), length])
    shape3 = g.op("Concat", [outer, length, inner], axis=0)
    x3 = tuple(g.op("Reshape", [flat, shape3]) for flat in flats)
    fills = _fills(g, s, xs[0], elem_type)
    if plan.scan == "doubling":
        y3 = _doubling(g, s, x3, plan.max_len, fills)
    else:
        y3 = _blocked(g, s, x3, length, outer, inner, plan, fills)
    g.op("Reshape", [y3[s.output], shape], outputs=[y])


def _sequential(g: GraphBuilder, s: Scan, xs: tuple[str, ...], axis: int, length: int,
                out: str | None = None) -> tuple[str, ...]:
    """Split, a chain of ``length - 1`` combines, Concat: every tensor of the running element
    (``out``: the scan's output only, under that name)."""
    if length == 1:
        if out is not None:
            return (g.op("Identity", [xs[s.output]], outputs=[out]),)
        return xs
    parts = list(zip(*(g.split(x, axis, length) for x in xs)))
    running = [parts[0]]
    ops = OnnxOps(g)
    for part in parts[1:]:
        running.append(s.combine(ops, running[-1], part))
    if out is not None:
        return (g.op("Concat", [r[s.output] for r in running], outputs=[out], axis=axis),)
    return tuple(g.op("Concat", [r[k] for r in running], axis=axis) for k in range(s.arity))


def _shift(g: GraphBuilder, x: str, k: int, rank: int, fill: str) -> str:
    """x shifted by k along axis 1, the first k entries filled with ``fill``."""
    pads = [0] * (2 * rank)
    pads[1] = k
    padded = g.op("Pad", [x, g.const(pads), fill], mode="constant")
    return g.op("Slice", [padded, g.const([0]), g.const([-k]), g.const([1])])


def _shifted(g: GraphBuilder, xs: tuple[str, ...], k: int, rank: int, fills: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_shift(g, x, k, rank, fill) for x, fill in zip(xs, fills))


def _doubling(g: GraphBuilder, s: Scan, xs: tuple[str, ...], max_len: int, fills: tuple[str, ...],
              rank: int = 3) -> tuple[str, ...]:
    """Hillis-Steele: after the pass of shift k, element i holds the combine of i-2k+1..i."""
    ops, k = OnnxOps(g), 1
    while k < max_len:
        xs = s.combine(ops, _shifted(g, xs, k, rank, fills), xs)
        k *= 2
    return xs


def _blocked(g: GraphBuilder, s: Scan, x3: tuple[str, ...], length: str, outer: str, inner: str, plan: ScanPlan,
             fills: tuple[str, ...]) -> tuple[str, ...]:
    block = g.const([plan.block])
    pad_len = g.op("Mod", [g.op("Sub", [block, g.op("Mod", [length, block])]), block])
    pads = g.op("Concat", [g.const([0, 0, 0, 0]), pad_len, g.const([0])], axis=0)
    shape4 = g.op("Concat", [outer, g.const([-1]), block, inner], axis=0)
    x4 = tuple(g.op("Reshape", [g.op("Pad", [x, pads, fill], mode="constant"), shape4]) for x, fill in zip(x3, fills))
    y4 = _sequential(g, s, x4, 2, plan.block)  # [P, blocks, block, Q]
    blocks = math.ceil(plan.max_len / plan.block)
    if blocks > 1:  # every block's total, scanned over the blocks; each block starts from the blocks before it
        totals = tuple(g.op("Slice", [y, g.const([-1]), g.const([INT64_MAX]), g.const([2])]) for y in y4)
        totals = _doubling(g, s, totals, blocks, fills, rank=4)
        y4 = s.combine(OnnxOps(g), _shifted(g, totals, 1, 4, fills), y4)
    shape3 = g.op("Concat", [outer, g.const([-1]), inner], axis=0)
    return tuple(g.op("Slice", [g.op("Reshape", [y, shape3]), g.const([0]), length, g.const([1])]) for y in y4)


def scan_function(s: Scan, plan: ScanPlan, opset: int) -> onnx.FunctionProto:
    """The scan's local function (``samout_edge::CumMax``, ``::LinearScan``): the native scan as its body."""
    g = GraphBuilder(s.op_type, opset)
    emit_scan(g, s, s.inputs, "y", axis=None, plan=plan)
    return helper.make_function(
        DOMAIN,
        s.op_type,
        inputs=list(s.inputs),
        outputs=["y"],
        nodes=g.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        # plugin_namespace is for TensorRT's parser (the plugin's namespace); the body ignores it.
        attributes=["axis", "plugin_namespace"],
        doc_string=f"{s.doc} Body correct up to length {plan.max_len}.",
    )


def all_nodes(nodes) -> list[onnx.NodeProto]:
    """``nodes`` and, depth first, the nodes of every subgraph they hold (an If's branches)."""
    found = []
    for node in nodes:
        found.append(node)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                found += all_nodes(sub.node)
    return found


def outer_inputs(node: onnx.NodeProto) -> list[str]:
    """Names a node's subgraphs (an If's branches) read from the enclosing graph."""
    names = []
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            inner = all_nodes(sub.node)
            made = {o for n in inner for o in n.output} | {i.name for i in sub.initializer}
            names += [i for n in inner for i in n.input if i and i not in made]
    return names


def scan_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The graph's scan nodes (placeholders, or custom nodes), every registered scan's."""
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type in sc.BY_OP]


def cummax_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in scan_nodes(model) if n.op_type == OP_TYPE]


def node_axis(node: onnx.NodeProto) -> int:
    for attr in node.attribute:
        if attr.name == "axis":
            return attr.i
    raise ValueError(f"{node.op_type} node {node.name!r} has no axis attribute")


def lower_scans(
    model: onnx.ModelProto,
    lowering: str,
    plan: ScanPlan,
    static_lengths: dict[int, int] | None = None,
    elem_type: int | None = None,
) -> onnx.ModelProto:
    """Make every placeholder scan node (CumMax, LinearScan) real, in place; returns ``model``.

    ``static_lengths`` maps an axis to its length where it is fixed (the head
    axis); ``elem_type`` is the ONNX dtype of the scanned tensors where the graph
    does not record a node's own (an fp32 island of an fp16 graph scans in fp32).
    ``custom`` keeps the nodes and adds one local function per scan the graph uses.
    """
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown lowering {lowering!r}; choose one of {LOWERINGS}")
    static_lengths = static_lengths or {}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    del model.functions[:]
    if lowering == "custom":
        for node in scan_nodes(model):
            if not any(a.name == "plugin_namespace" for a in node.attribute):
                node.attribute.append(helper.make_attribute("plugin_namespace", DOMAIN))
        used = {n.op_type for n in scan_nodes(model)}
        model.functions.extend(scan_function(s, plan, opset) for s in sc.SCANS.values() if s.op_type in used)
        _set_opset(model, DOMAIN, OP_VERSION)
        return model

    graph = model.graph
    recorded = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.domain == DOMAIN and node.op_type in sc.BY_OP:
            axis = node_axis(node)
            g = GraphBuilder(node.name or f"scan_{len(nodes)}", opset)
            emit_scan(g, sc.BY_OP[node.op_type], tuple(node.input), node.output[0], axis, plan,
                      static_lengths.get(axis), recorded.get(node.input[0]) or elem_type)
            nodes.extend(g.nodes)
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_opset(model, DOMAIN)
    return model


def _set_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    _drop_opset(model, domain)
    model.opset_import.append(helper.make_opsetid(domain, version))


def _drop_opset(model: onnx.ModelProto, domain: str) -> None:
    keep = [o for o in model.opset_import if o.domain != domain]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def standalone_model(
    lowering: str,
    plan: ScanPlan,
    axis: int,
    dtype: str = "fp32",
    rank: int = 4,
    opset: int = 18,
    static_len: int | None = None,
    scan: str = "max",
) -> onnx.ModelProto:
    """A one-op model ``y = scan(inputs, axis)`` (scans.py): for ``bench op`` and the exactness tests."""
    s = sc.scan(scan)
    elem = graph_dtype(dtype).onnx
    dims = [f"d{i}" for i in range(rank)]
    if static_len is not None:
        dims[axis] = static_len
    node = helper.make_node(s.op_type, list(s.inputs), ["y"], name=s.name, domain=DOMAIN, axis=axis)
    graph = helper.make_graph(
        [node],
        s.name,
        [helper.make_tensor_value_info(x, elem, dims) for x in s.inputs],
        [helper.make_tensor_value_info("y", elem, dims)],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, OP_VERSION)],
        producer_name="samout-edge",
        # the oldest IR the opset allows, not this onnx's newest: older runtimes
        # (ONNX Runtime 1.23 on Python 3.10) refuse IR versions they do not know
        ir_version=helper.find_min_ir_version_for([helper.make_opsetid("", opset)]),
    )
    lower_scans(model, lowering, plan, {axis: static_len} if static_len else None, elem)
    return model


def register_placeholder_schema() -> None:
    """Teach onnx (and so the torch exporter) the placeholder ops, once per process."""
    for s in sc.SCANS.values():
        if onnx.defs.has(s.op_type, DOMAIN):
            continue
        schema = onnx.defs.OpSchema(
            s.op_type,
            DOMAIN,
            OP_VERSION,
            doc=s.doc,
            inputs=[onnx.defs.OpSchema.FormalParameter(x, "T") for x in s.inputs],
            outputs=[onnx.defs.OpSchema.FormalParameter("y", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float types")],
            attributes=[
                onnx.defs.OpSchema.Attribute("axis", onnx.defs.OpSchema.AttrType.INT, "scan axis, >= 0"),
                onnx.defs.OpSchema.Attribute(
                    "plugin_namespace", onnx.defs.OpSchema.AttrType.STRING, "TensorRT plugin namespace", required=False
                ),
            ],
        )
        onnx.defs.register_schema(schema)
