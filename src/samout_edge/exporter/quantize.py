"""Weight-only INT8 / INT4 exports: round-to-nearest, symmetric, zero-point zero.

What is quantized: every Linear weight (the MatMuls: ``combined``, ``ffn1``,
``ffn2``, ``gate``, ``head``) and the embedding table (its Gather). LayerNorm,
biases and ``alpha`` stay float.

The grid (models/grid.py): per row of a weight in torch's layout (a Linear's
output channel, an embedding's token) and per block of ``block`` consecutive
inputs, ``q = clip(rint(w / s), -qmax - 1, qmax)``, qmax 127 (int8) or 7 (int4):
the full two's-complement range (int4: 16 levels), with ``s = max|w| / d`` for
the d in [qmax, qmax + 1] (9 steps) whose squared rounding error over the block
is least (in the export's float dtype; an all-zero block gets 1). d = qmax is
the classic 15-level grid, so the search is never worse; on the trained SamOut
it cuts the int4 weights' relative RMS error from 0.089 to 0.080. INT8 has one
scale per row (per output channel); INT4 one per block of ``block_size`` inputs
(default 32). Symmetric because TensorRT's DequantizeLinear takes only a
zero zero-point (onnx-tensorrt's importer, every release), and because one grid
then serves both graph forms, which so compute the same function. Asymmetric
would fit the seed preset's (random) weights a little better: relative RMS error
0.064 vs 0.069 at int4 block 32, 0.0040 vs 0.0041 at int8.

Verification stays exact: ``quantize_model`` replaces the model's weights by
``dequantize(quantize(w))`` *before* torch.export traces it, so the traced
graph's float initializers are the dequantized weights, and the golden outputs
are recorded from a model with the same dequantized weights. ``quantize_graph``
then swaps each such initializer for its integer form, matching it bit for bit
(a weight it cannot match is an error, never silently left float). A
DequantizeLinear computes ``q * s`` in the scale's dtype, the same product
numpy computes here, so the graph's weights are the golden model's exactly and
the fp32 tolerance holds.

Graph forms (``export.json``'s ``weights.format``):

- ``dq``: standard ONNX, ``DequantizeLinear`` (opset 21: INT4 and ``block_size``;
  INT8 per-axis from opset 13) feeding the MatMuls and the Gather, with an
  explicit all-zero zero-point (TensorRT 8.x needs the third input). ONNX
  Runtime and TensorRT 10+ (INT8 also 8.x) take the same file. ONNX Runtime
  needs ``weights.ort_session_config`` (ORT_SESSION_CONFIG): left to itself it
  fuses DequantizeLinear -> MatMul into MatMulNBits computing with int8
  activations, which is not the verified function.
- ``matmulnbits``: ONNX Runtime's contrib ops (domain ``com.microsoft``):
  ``MatMulNBits`` for the MatMuls and ``GatherBlockQuantized`` for the embedding,
  with ``accuracy_level`` 1 (fp32 compute: the dequantized weights, exactly).
  ONNX Runtime only; no TensorRT parses them.

``--weights-format auto`` picks per kind what measured faster on ONNX Runtime's
CPU (artifact/quantization.py AUTO_FORMAT; the numbers are in REASONS and in
export.json). The options become one spec there (``Weights.from_options``), which
this module's ``quantize_graph`` follows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from samout_edge.artifact.initializers import FOUR_BIT, initializer_bytes
from samout_edge.artifact.quantization import (  # noqa: F401 - the tables --weights resolves to, also here
    AUTO_FORMAT,
    DISABLE_KLEIDIAI,
    FORMATS,
    NBITS_BLOCKS,
    ORT_SESSION_CONFIG,
    QUANT_OPSET,
    REASONS,
)
from samout_edge.errors import SamoutError
from samout_edge.models.grid import QuantizedWeight, dequantize, nbits_block  # the grid: below the runtime

ORT_DOMAIN = "com.microsoft"
# accuracy_level of MatMulNBits: 1 computes in fp32, the dequantized model's function; 4
# quantizes the activations to int8 too (``--activations int8``: faster, a stated tolerance).
ACCURACY_LEVEL = {"fp": 1, "int8": 4}


# --------------------------------------------------------------------------- the graph


@dataclass
class GraphReport:
    """What quantize_graph did: the export.json ``weights`` entry is built from it."""

    format: str
    quantized: list[str]  # parameter names
    bytes: int  # every initializer of the quantized graph (what model.onnx's weights take)
    float_bytes: int  # the same graph's initializers with the quantized weights in float


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() + str(a.shape) + str(a.dtype)


def _int_tensor(name: str, values: np.ndarray, bits: int, unsigned: bool = False) -> onnx.TensorProto:
    """INT8, or INT4 packed two a byte (raw data, low nibble first, as ONNX stores it);
    UINT4 (``unsigned``) for an asymmetric grid's integers and zero-points."""
    if bits == 8:
        return numpy_helper.from_array(np.ascontiguousarray(values, dtype=np.int8), name)
    import ml_dtypes  # onnx's own dependency

    return numpy_helper.from_array(np.ascontiguousarray(values).astype(ml_dtypes.uint4 if unsigned else ml_dtypes.int4),
                                   name)


def _dq(qw: QuantizedWeight, transposed: bool, base: str, output: str):
    """(initializers, node): DequantizeLinear of ``qw`` in the layout the graph
    holds (``transposed``: ``[cols, rows]``, a MatMul's B)."""
    q = qw.q.T if transposed else qw.q
    if qw.bits == 8:  # one scale per row: per axis, on the row axis (opset 13)
        scale = qw.scale[:, 0]
        attrs = {"axis": 1 if transposed else 0}
    else:  # blocks along the columns (opset 21)
        scale = qw.scale.T if transposed else qw.scale
        attrs = {"axis": 0 if transposed else 1, "block_size": qw.block}
    if qw.asymmetric:
        zero = qw.zero.T if transposed else qw.zero
    else:
        zero = np.zeros(scale.shape, np.int8)
    inits = [
        _int_tensor(f"{base}.q", q, qw.bits, qw.asymmetric),
        numpy_helper.from_array(np.ascontiguousarray(scale), f"{base}.scale"),
        _int_tensor(f"{base}.zero_point", zero, qw.bits, qw.asymmetric),
    ]
    node = helper.make_node("DequantizeLinear", [t.name for t in inits], [output], name=f"{base}.dequantize", **attrs)
    return inits, node


def _pack_nbits(qw: QuantizedWeight, block: int) -> np.ndarray:
    """MatMulNBits' B: ``[rows, blocks, block * bits / 8]`` uint8, values offset by
    2^(bits-1) (its default zero-point; an asymmetric grid's as they are), two 4-bit
    values a byte, low nibble first."""
    rows, cols = qw.q.shape
    blocks = -(-cols // block)
    u = np.zeros((rows, blocks * block), np.uint8)
    offset = 0 if qw.asymmetric else 1 << (qw.bits - 1)
    u[:, :cols] = (qw.q.astype(np.int16) + offset).astype(np.uint8)
    if qw.bits == 4:
        u = _pack_nibbles(u)
    return u.reshape(rows, blocks, -1)


def _pack_nibbles(u: np.ndarray) -> np.ndarray:
    """``[rows, n]`` values below 16 -> ``[rows, ceil(n / 2)]`` bytes, low nibble first."""
    if u.shape[1] % 2:
        u = np.concatenate([u, np.zeros((u.shape[0], 1), u.dtype)], axis=1)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def _nbits_scales(qw: QuantizedWeight, block: int) -> np.ndarray:
    if qw.per_row and block != qw.block:  # one scale per row, spread over MatMulNBits' blocks
        blocks = -(-qw.q.shape[1] // block)
        return np.repeat(qw.scale, blocks, axis=1)
    return qw.scale


def nbits_block_ok(block: int) -> bool:
    return block in NBITS_BLOCKS


def _matmulnbits(qw: QuantizedWeight, base: str, a: str, output: str, node_name: str, accuracy_level: int):
    rows, cols = qw.q.shape  # N, K
    block = nbits_block(qw)
    inits = [
        numpy_helper.from_array(_pack_nbits(qw, block), f"{base}.nbits"),
        numpy_helper.from_array(np.ascontiguousarray(_nbits_scales(qw, block).reshape(-1)), f"{base}.scales"),
    ]
    if qw.asymmetric:  # [rows, ceil(blocks / 2)] uint8, a row's block zero-points two a byte, flattened
        inits.append(numpy_helper.from_array(_pack_nibbles(qw.zero.astype(np.uint8)).reshape(-1),
                                             f"{base}.zero_points"))
    node = helper.make_node("MatMulNBits", [a, *(t.name for t in inits)], [output], name=node_name, domain=ORT_DOMAIN,
                            K=cols, N=rows, bits=qw.bits, block_size=block, accuracy_level=accuracy_level)
    return inits, node


def _gather_quantized(qw: QuantizedWeight, base: str, indices: str, output: str, node_name: str):
    """GatherBlockQuantized on the table's rows; INT8 as uint8 with zero-point 128."""
    rows, cols = qw.q.shape
    block = nbits_block(qw)
    scale = _nbits_scales(qw, block)
    if qw.bits == 4:
        data = _int_tensor(f"{base}.q", qw.q, 4)
        inits = [data, numpy_helper.from_array(np.ascontiguousarray(scale), f"{base}.scale")]
    else:
        data = numpy_helper.from_array((qw.q.astype(np.int16) + 128).astype(np.uint8), f"{base}.q")
        zero = numpy_helper.from_array(np.full(scale.shape, 128, np.uint8), f"{base}.zero_point")
        inits = [data, numpy_helper.from_array(np.ascontiguousarray(scale), f"{base}.scale"), zero]
    names = [t.name for t in inits]
    node = helper.make_node("GatherBlockQuantized", [names[0], indices, *names[1:]], [output], name=node_name,
                            domain=ORT_DOMAIN, gather_axis=0, quantize_axis=1, block_size=block, bits=qw.bits)
    return inits, node


def quantize_graph(model: onnx.ModelProto, table: dict[str, QuantizedWeight], fmt: str,
                   activations: str = "fp") -> GraphReport:
    """Replace every float initializer that is a quantized weight (matched bit for
    bit with ``dequantize`` of the grid, in either layout) by its integer form:
    DequantizeLinear (``dq``), or MatMulNBits / GatherBlockQuantized where the
    weight is a MatMul's B or the Gather's table (``matmulnbits``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weights format {fmt!r}")
    float_bytes = initializer_bytes(model)
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for i, x in enumerate(node.input):
            consumers.setdefault(x, []).append((node, i))
    found = _match_weights(model, table, consumers)
    new_inits: list[onnx.TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> the nodes that replace it
    for init_name, (param, transposed, widened) in found.items():
        qw, uses = table[param], consumers[init_name]
        rest = uses
        if fmt == "matmulnbits" and nbits_block(qw) is not None and not widened:
            rest = _contrib_ops(qw, param, transposed, uses, ACCURACY_LEVEL[activations], new_inits, replaced)
        if rest and widened:  # DequantizeLinear in the grid's fp16, then Cast: the same fp32 values
            inits, node = _dq(qw, transposed, param, f"{init_name}.fp16")
            new_inits += inits
            new_nodes += [node, helper.make_node("Cast", [f"{init_name}.fp16"], [init_name], name=f"{param}.to_fp32",
                                                 to=TensorProto.FLOAT)]
        elif rest:  # DequantizeLinear, under the initializer's own name: its consumers are unchanged
            inits, node = _dq(qw, transposed, param, init_name)
            new_inits += inits
            new_nodes.append(node)
    keep = [t for t in model.graph.initializer if t.name not in found]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + new_inits)
    nodes = list(new_nodes)
    for node in model.graph.node:
        nodes += replaced.get(id(node), [node])
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if fmt == "matmulnbits" and not any(o.domain == ORT_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(ORT_DOMAIN, 1))
    return GraphReport(fmt, sorted(p for p, _, _ in found.values()), initializer_bytes(model), float_bytes)


def _match_weights(model: onnx.ModelProto, table: dict[str, QuantizedWeight],
                   consumers: dict[str, list[tuple[onnx.NodeProto, int]]]) -> dict[str, tuple[str, bool, bool]]:
    """initializer -> (parameter, transposed, widened to fp32) for every float initializer a
    MatMul, Gemm or Gather uses as its weight; each must match a quantized parameter bit for
    bit, and each parameter must be found (an internal error otherwise: the export would not
    be the verified function)."""
    # digest of a layout -> (parameter, transposed, as fp32): an fp16 model's fp32 islands (exporter/precision.py)
    # use its weights cast to fp32, which the exporter may fold into fp32 initializers
    keys: dict[str, tuple[str, bool, bool]] = {}
    digests: dict[str, set[str]] = {}  # parameter -> the digests of its layouts
    for name, qw in table.items():
        deq = dequantize(qw)
        forms = [(deq, False, False), (deq.T, True, False)]
        if deq.dtype == np.float16:
            forms += [(deq.astype(np.float32), False, True), (deq.astype(np.float32).T, True, True)]
        digests[name] = set()
        for array, transposed, widened in forms:
            digests[name].add(_digest(array))
            keys.setdefault(_digest(array), (name, transposed, widened))

    def is_weight_use(node: onnx.NodeProto, i: int, depth: int = 0) -> bool:
        """A MatMul's B, a Gemm's B or a Gather's table, directly or through Cast/Transpose (an fp32 island)."""
        if node.domain not in ("", "ai.onnx"):
            return False
        if (node.op_type, i) in (("MatMul", 1), ("Gather", 0), ("Gemm", 1)):
            return True
        return node.op_type in ("Cast", "Transpose") and depth < 3 and \
            any(is_weight_use(n, j, depth + 1) for n, j in consumers.get(node.output[0], []))

    found: dict[str, tuple[str, bool, bool]] = {}
    seen: set[str] = set()  # digests of the initializers matched
    for init in model.graph.initializer:
        uses = consumers.get(init.name, [])
        if init.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16) or not any(is_weight_use(n, i) for n, i in uses):
            continue
        digest = _digest(numpy_helper.to_array(init))
        if digest not in keys:
            raise SamoutError(f"the graph's weight {init.name!r} {list(init.dims)} matches no quantized parameter "
                              "(internal error: the export would not be the verified function)")
        found[init.name] = keys[digest]
        seen.add(digest)
    # equal weights share one initializer (the exporter deduplicates them): each needs a match, not its own
    missing = {name for name, own in digests.items() if not own & seen}
    if missing:
        raise SamoutError(f"quantized parameters not found in the graph: {', '.join(sorted(missing))} (internal error)")
    return found


def _contrib_ops(qw: QuantizedWeight, base: str, transposed: bool, uses: list[tuple[onnx.NodeProto, int]],
                 accuracy_level: int, new_inits: list[onnx.TensorProto],
                 replaced: dict[int, list[onnx.NodeProto]]) -> list[tuple[onnx.NodeProto, int]]:
    """The matmulnbits form: each use of the weight that is a MatMul's B (transposed) or an
    axis-0 Gather's table becomes MatMulNBits / GatherBlockQuantized (its initializers added to
    ``new_inits``, the node to ``replaced``); returns the other uses (they get DequantizeLinear)."""
    rest = []
    for k, (node, i) in enumerate(uses):
        suffix = "" if len(uses) == 1 else f".{k}"
        if node.op_type == "MatMul" and i == 1 and transposed:
            inits, new = _matmulnbits(qw, base + suffix, node.input[0], node.output[0], node.name, accuracy_level)
        elif node.op_type == "Gather" and i == 0 and not transposed and _axis(node) == 0:
            inits, new = _gather_quantized(qw, base + suffix, node.input[1], node.output[0], node.name)
        else:
            rest.append((node, i))
            continue
        new_inits += inits
        replaced[id(node)] = [new]
    return rest


def has_int4(model: onnx.ModelProto) -> bool:
    return any(t.data_type in FOUR_BIT for t in model.graph.initializer)


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)
