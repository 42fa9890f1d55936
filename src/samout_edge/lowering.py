"""Cumulative max in ONNX: there is no CumMax op, so we build one.

The exporter first emits one placeholder node per cummax, ``samout_edge::CumMax``
(attribute ``axis``). This module then makes it real, one of two ways:

- ``native``: the node is replaced by standard ONNX ops (runs on every runtime
  and every TensorRT).
- ``custom``: the node stays (op ``CumMax``, domain ``samout_edge``, version 1;
  attributes ``axis`` and ``plugin_namespace="samout_edge"``), and the model
  carries a local function of the same name whose body is the native scan.
  TensorRT with the CumMax plugin runs the plugin; ONNX Runtime and TensorRT
  without it run the function body.

A scan along a dynamic axis must be unrolled for the longest length it will ever
see: ``max_len``. The number of steps comes from ``max_len``, never from the
length used for tracing. Scans (all bit-exact, since max is exact):

- ``doubling``: log-step (Hillis-Steele) scan, ceil(log2(max_len)) passes of
  shift+max over the whole tensor.
- ``blocked``: split the axis into blocks of ``block``; a sequential running max
  inside each block (about one pass), a doubling scan over the block maxima
  (1/block of the data), then one broadcast max: about four passes in all.
- a static axis (the head axis) is scanned sequentially, ``len - 1`` Max ops.

Every scan flattens the input to ``[P, L, Q]`` around the scan axis, so one body
serves any axis and rank.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from samout_edge.artifact.graph import CUMMAX_DOMAIN as DOMAIN
from samout_edge.artifact.graph import CUMMAX_OP as OP_TYPE
from samout_edge.artifact.graph import CUMMAX_VERSION as OP_VERSION
from samout_edge.artifact.graph import dtype as graph_dtype

SCANS = ("blocked", "doubling")
LOWERINGS = ("native", "custom")
DEFAULT_BLOCK = 16
# A static axis up to this long is scanned sequentially (Split + Max chain + Concat).
MAX_SEQUENTIAL_LEN = 64
INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class ScanPlan:
    """How one cummax is written in ONNX ops, and the longest axis it is correct for."""

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


def emit_cummax(
    g: GraphBuilder,
    x: str,
    y: str,
    axis: int | None,
    plan: ScanPlan,
    static_len: int | None = None,
    elem_type: int | None = None,
) -> None:
    """Append nodes computing ``y = cummax(x, axis)``.

    ``axis=None`` reads it from the enclosing function's ``axis`` attribute.
    ``static_len`` (the axis length, when every input has the same one) allows
    the cheapest scan, a sequential one with no padding. ``elem_type`` (the ONNX
    dtype of x) lets the fill constant be typed directly; without it (a function
    body, generic in dtype) CastLike does it, which TensorRT parses from 9.1.
    """
    if static_len is None and axis is not None:  # a dynamic axis: one element (a decode step) is its own max
        _one_or_scan(g, x, y, axis, plan, elem_type)  # (not in the CumMax function's body: onnx.inliner and
        return  # onnx.reference mishandle an If there; TensorRT's plugin or ONNX Runtime run that one)
    if static_len is not None and static_len <= MAX_SEQUENTIAL_LEN and axis is not None:
        _sequential(g, x, axis, static_len, y)  # on x itself: no reshape around it (9 nodes for 8 heads, not 20)
        return
    _scan(g, x, y, axis, plan, elem_type)


def _one_or_scan(g: GraphBuilder, x: str, y: str, axis: int, plan: ScanPlan, elem_type: int | None) -> None:
    """``If(length == 1, x, scan(x))``: a decode step runs one If instead of the scan's ~70
    nodes per cummax, whose fixed cost dominated a one-token step on CPUs (the seed
    preset's decode ran 717 nodes; measured in docs/benchmarking.md). Both branches
    compute the same values for length 1, so the If is exact."""
    ax, ax_next = _axis_range(g, axis)
    length = g.op("Slice", [g.op("Shape", [x]), ax, ax_next])
    one = g.op("Squeeze", [g.op("Equal", [length, g.const([1])])])
    branches = {}
    for branch in ("one", "scan"):
        sub = GraphBuilder(f"{g.prefix}/{branch}", g.opset)
        out = sub.name("y")
        if branch == "one":
            sub.op("Identity", [x], outputs=[out])
        else:
            _scan(sub, x, out, axis, plan, elem_type)
        typed = helper.make_tensor_value_info(out, elem_type or onnx.TensorProto.UNDEFINED, None)
        branches[branch] = helper.make_graph(sub.nodes, sub.prefix.replace("/", "_"), [], [typed])
    g.op("If", [one], outputs=[y], then_branch=branches["one"], else_branch=branches["scan"])


def _axis_range(g: GraphBuilder, axis: int | None) -> tuple[str, str]:
    """[axis] and [axis + 1] as 1-D int64 tensors (from the function's attribute where axis is None)."""
    if axis is not None:
        return g.const([axis]), g.const([axis + 1])
    ax = g.op("Unsqueeze", [g.attribute_int("axis"), g.const([0])])
    return ax, g.op("Add", [ax, g.const([1])])


def _scan(g: GraphBuilder, x: str, y: str, axis: int | None, plan: ScanPlan, elem_type: int | None) -> None:
    """The padded scan over ``[P, L, Q]`` (``plan.scan``): any length up to ``plan.max_len``."""
    ax, ax_next = _axis_range(g, axis)
    if axis is not None:
        flat = g.op("Flatten", [x], axis=axis)
    else:
        flat = g.op("Flatten", [x])
        flat_node = g.nodes[-1]
        flat_node.attribute.append(helper.make_attribute_ref("axis", onnx.AttributeProto.INT))
    # [P, L, Q] around the scan axis: P, L*Q from the flattened shape, L from x's shape.
    shape = g.op("Shape", [x])
    length = g.op("Slice", [shape, ax, ax_next])
    flat_shape = g.op("Shape", [flat])
    outer = g.op("Slice", [flat_shape, g.const([0]), g.const([1])])
    inner = g.op("Div", [g.op("Slice", [flat_shape, g.const([1]), g.const([2])]), length])
    x3 = g.op("Reshape", [flat, g.op("Concat", [outer, length, inner], axis=0)])

    def neg_inf() -> str:
        """The padding value, emitted only by scans that pad (no dead Constant nodes)."""
        if elem_type is None:
            return g.op("CastLike", [g.const(-np.inf, np.float32), x])
        return g.const(-np.inf, onnx.helper.tensor_dtype_to_np_dtype(elem_type))

    if plan.scan == "doubling":
        y3 = _doubling(g, x3, plan.max_len, neg_inf())
    else:
        y3 = _blocked(g, x3, length, outer, inner, plan, neg_inf())
    g.op("Reshape", [y3, shape], outputs=[y])


def _sequential(g: GraphBuilder, x: str, axis: int, length: int, out: str | None = None) -> str:
    outputs = 1 if out is None else [out]
    if length == 1:
        return g.op("Identity", [x], outputs=outputs)
    parts = g.split(x, axis, length)
    running = [parts[0]]
    for part in parts[1:]:
        running.append(g.op("Max", [running[-1], part]))
    return g.op("Concat", running, outputs=outputs, axis=axis)


def _shift(g: GraphBuilder, x: str, k: int, rank: int, fill: str) -> str:
    """x shifted by k along axis 1, the first k entries filled with ``fill``."""
    pads = [0] * (2 * rank)
    pads[1] = k
    padded = g.op("Pad", [x, g.const(pads), fill], mode="constant")
    return g.op("Slice", [padded, g.const([0]), g.const([-k]), g.const([1])])


def _doubling(g: GraphBuilder, x: str, max_len: int, fill: str, rank: int = 3) -> str:
    k = 1
    while k < max_len:
        x = g.op("Max", [x, _shift(g, x, k, rank, fill)])
        k *= 2
    return x


def _blocked(g: GraphBuilder, x3: str, length: str, outer: str, inner: str, plan: ScanPlan, fill: str) -> str:
    block = g.const([plan.block])
    pad_len = g.op("Mod", [g.op("Sub", [block, g.op("Mod", [length, block])]), block])
    pads = g.op("Concat", [g.const([0, 0, 0, 0]), pad_len, g.const([0])], axis=0)
    padded = g.op("Pad", [x3, pads, fill], mode="constant")
    x4 = g.op("Reshape", [padded, g.op("Concat", [outer, g.const([-1]), block, inner], axis=0)])
    y4 = _sequential(g, x4, 2, plan.block)  # [P, blocks, block, Q]
    blocks = math.ceil(plan.max_len / plan.block)
    if blocks > 1:
        block_max = g.op("Slice", [y4, g.const([-1]), g.const([INT64_MAX]), g.const([2])])
        block_max = _doubling(g, block_max, blocks, fill, rank=4)
        y4 = g.op("Max", [y4, _shift(g, block_max, 1, 4, fill)])
    y3 = g.op("Reshape", [y4, g.op("Concat", [outer, g.const([-1]), inner], axis=0)])
    return g.op("Slice", [y3, g.const([0]), length, g.const([1])])


def cummax_function(plan: ScanPlan, opset: int) -> onnx.FunctionProto:
    """The ``samout_edge::CumMax`` local function: the native scan as its body."""
    g = GraphBuilder("CumMax", opset)
    emit_cummax(g, "x", "y", axis=None, plan=plan)
    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        inputs=["x"],
        outputs=["y"],
        nodes=g.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        # plugin_namespace is for TensorRT's parser (the plugin's namespace); the body ignores it.
        attributes=["axis", "plugin_namespace"],
        doc_string=f"Running maximum along `axis` (values of torch.cummax); body correct up to length {plan.max_len}.",
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


def cummax_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def node_axis(node: onnx.NodeProto) -> int:
    for attr in node.attribute:
        if attr.name == "axis":
            return attr.i
    raise ValueError(f"{OP_TYPE} node {node.name!r} has no axis attribute")


def lower_cummax(
    model: onnx.ModelProto,
    lowering: str,
    plan: ScanPlan,
    static_lengths: dict[int, int] | None = None,
    elem_type: int | None = None,
) -> onnx.ModelProto:
    """Make every placeholder CumMax node real (in place); returns ``model``.

    ``static_lengths`` maps an axis to its length where it is fixed (the head
    axis); ``elem_type`` is the ONNX dtype of the scanned tensors.
    """
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown lowering {lowering!r}; choose one of {LOWERINGS}")
    static_lengths = static_lengths or {}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if lowering == "custom":
        for node in cummax_nodes(model):
            if not any(a.name == "plugin_namespace" for a in node.attribute):
                node.attribute.append(helper.make_attribute("plugin_namespace", DOMAIN))
        del model.functions[:]
        model.functions.append(cummax_function(plan, opset))
        _set_opset(model, DOMAIN, OP_VERSION)
        return model

    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type == OP_TYPE:
            axis = node_axis(node)
            g = GraphBuilder(node.name or f"cummax_{len(nodes)}", opset)
            emit_cummax(g, node.input[0], node.output[0], axis, plan, static_lengths.get(axis), elem_type)
            nodes.extend(g.nodes)
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.functions[:]
    _drop_opset(model, DOMAIN)
    return model


@dataclass(frozen=True)
class ScanSite:
    """Where one cummax sits in a graph: its input and output tensors and its axis. The sites
    are recorded in the graph's metadata (SITES_KEY), so verify can cut each scan out of the
    exported graph and check the graph's own nodes bit for bit, not a fresh copy of the op."""

    x: str
    y: str
    axis: int


SITES_KEY = "samout_edge.scan_sites"


def cummax_sites(model: onnx.ModelProto) -> list[ScanSite]:
    """The placeholder (or custom) CumMax nodes' sites, in graph order."""
    return [ScanSite(n.input[0], n.output[0], node_axis(n)) for n in cummax_nodes(model)]


def record_sites(model: onnx.ModelProto, sites: list[ScanSite]) -> None:
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                   SITES_KEY: json.dumps([[s.x, s.y, s.axis] for s in sites])})


def read_sites(model: onnx.ModelProto) -> list[ScanSite] | None:
    """The recorded sites, or None for a graph exported before they were recorded."""
    for prop in model.metadata_props:
        if prop.key == SITES_KEY:
            try:
                return [ScanSite(str(x), str(y), int(axis)) for x, y, axis in json.loads(prop.value)]
            except (ValueError, TypeError) as e:
                raise ValueError(f"the graph's {SITES_KEY} metadata is malformed ({e})") from None
    return None


def _outer_inputs(node: onnx.NodeProto) -> list[str]:
    """Names a node's subgraphs (an If's branches) read from the enclosing graph."""
    names = []
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            inner = all_nodes(sub.node)
            made = {o for n in inner for o in n.output} | {i.name for i in sub.initializer}
            names += [i for n in inner for i in n.input if i and i not in made]
    return names


def scan_model(model: onnx.ModelProto, site: ScanSite) -> onnx.ModelProto:
    """The nodes of ``model`` that compute ``site.y`` from ``site.x``, as a model of their own
    (input ``x``, output ``y``; the model's local functions and opsets kept). Fails if they read
    anything else than ``x``, constants and initializers: then they are not one scan."""
    g = model.graph
    producers = {out: node for node in g.node for out in node.output}
    initializers = {i.name: i for i in g.initializer}
    needed: set[int] = set()
    used_initializers: set[str] = set()
    stack, seen = [site.y], set()
    while stack:
        name = stack.pop()
        if not name or name == site.x or name in seen:
            continue
        seen.add(name)
        if name in initializers:
            used_initializers.add(name)
            continue
        node = producers.get(name)
        if node is None:
            raise ValueError(f"the scan {site.x} -> {site.y} reads {name!r}, which it does not compute")
        needed.add(id(node))
        stack += list(node.input) + _outer_inputs(node)
    nodes = [n for n in g.node if id(n) in needed]
    elem = next((v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.output) if v.name == site.y), None)
    if elem is None:
        elem = g.input[1].type.tensor_type.elem_type if len(g.input) > 1 else onnx.TensorProto.FLOAT
    dims = ["b", "h", "s", "d"]
    sub = helper.make_graph(nodes, "scan", [helper.make_tensor_value_info(site.x, elem, dims)],
                            [helper.make_tensor_value_info(site.y, elem, dims)],
                            [initializers[n] for n in sorted(used_initializers)])
    out = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                            functions=list(model.functions))
    return out


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
) -> onnx.ModelProto:
    """A one-op model ``y = cummax(x, axis)``: for ``bench op`` and the exactness tests."""
    elem = graph_dtype(dtype).onnx
    dims = [f"d{i}" for i in range(rank)]
    if static_len is not None:
        dims[axis] = static_len
    node = helper.make_node(OP_TYPE, ["x"], ["y"], name="cummax", domain=DOMAIN, axis=axis)
    graph = helper.make_graph(
        [node],
        "cummax",
        [helper.make_tensor_value_info("x", elem, dims)],
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
    lower_cummax(model, lowering, plan, {axis: static_len} if static_len else None, elem)
    return model


def register_placeholder_schema() -> None:
    """Teach onnx (and so the torch exporter) the placeholder op, once per process."""
    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    schema = onnx.defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        OP_VERSION,
        doc="Running maximum along `axis`: the values of torch.cummax(x, axis).",
        inputs=[onnx.defs.OpSchema.FormalParameter("x", "T")],
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
    healthy rows). A few tiny nodes per graph.
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
