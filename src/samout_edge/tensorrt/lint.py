"""Will TensorRT parse this graph? Every node checked against the ONNX parser's
documented operator support for the TensorRT versions in the field.

The data (data/tensorrt_onnx_ops.toml) is transcribed from onnx-tensorrt's
docs/operators.md per release; its header names each source. A node fails when
its op is unsupported or unknown for a version, its input dtype is not listed, or
an input the parser needs as a constant (Slice/Pad/Squeeze/Unsqueeze/Reduce axes)
is computed where that version needs a constant. Custom-domain nodes need a
plugin; the scan nodes (CumMax, LinearScan) have ours and also carry a local
function body. Which of the two runs, per version, is versions.cummax_runner (the
one versions table, the same for every scan op).

Quantized weights (``export --weights int8|int4``): a DequantizeLinear must also
meet its parser's rules (versions.DQ_*, sources in the toml's header): INT4 and
blocked scales from 10.0; the zero-point input and FP32 scales on 8.x; on every
version a zero zero-point, positive scales and whole blocks. ONNX Runtime's
contrib ops (``--weights-format matmulnbits``) parse on no TensorRT.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np
import onnx

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (JetPack 6)
    import tomli as tomllib
from onnx import TensorProto, numpy_helper

from samout_edge.lowering import all_nodes
from samout_edge.tensorrt import versions
from samout_edge.tensorrt.plugin import SCAN_OF_PLUGIN

# Which JetPack (or product line) ships each TensorRT version we lint for.
FIELD = {
    "8.5": "JetPack 5.1",
    "8.6": "JetPack 6.0",
    "10.3": "JetPack 6.1/6.2",
    "10.13": "JetPack 7 (Thor)",
    "11.1": "desktop/datacenter 11.x",
}

DOC_TYPES = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8",
    TensorProto.INT4: "INT4",
    TensorProto.BOOL: "BOOL",
}


@dataclass
class LintIssue:
    severity: str  # error: the parser fails or computes something else; warning: may; note: informational
    node: str
    op: str
    message: str


@dataclass
class VersionLint:
    version: str
    field: str
    compatible: bool
    source: str
    issues: list[LintIssue] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=1)
def support_table() -> dict:
    text = resources.files("samout_edge.tensorrt").joinpath("data/tensorrt_onnx_ops.toml").read_text()
    return tomllib.loads(text)["versions"]


def needs_constant(op: str, version: str) -> int | None:
    """The input index the parser needs as a build-time constant for ``op`` on this
    TensorRT, or None (no such input, or computed ones are fine there)."""
    entry = versions.CONSTANT_AXES.get(op)
    if entry is None:
        return None
    index, computed_ok = entry
    return None if computed_ok is not None and computed_ok.available(version) else index


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is a help, not a requirement
        inferred = model
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    for node in g.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def _constants(nodes, initializers) -> set[str]:
    names = {t.name for t in initializers}
    names.update(n.output[0] for n in all_nodes(nodes) if n.op_type == "Constant")
    return names


def _check_nodes(nodes, constants: set[str], types: dict[str, int], version: str, ops: dict, prefix: str,
                 severity: str) -> list[LintIssue]:
    issues = []
    legacy_int64 = not versions.INT64.available(version)  # the 8.x parser casts INT64 to INT32
    for node in all_nodes(nodes):  # an If's branches are parsed too
        if node.domain not in ("", "ai.onnx"):
            continue
        name = prefix + (node.name or node.output[0])
        row = ops.get(node.op_type)
        if row is None:
            issues.append(LintIssue(severity, name, node.op_type, f"{node.op_type} is not in TensorRT {version}'s operator table"))
            continue
        if not row["supported"]:
            issues.append(LintIssue(severity, name, node.op_type,
                                    f"{node.op_type} is not supported by TensorRT {version} ({row['restrictions'] or 'marked N'})"))
            continue
        tensor = node.input[0] if node.input and node.input[0] else (node.output[0] if node.output else "")
        elem = types.get(tensor, TensorProto.UNDEFINED)
        doc_type = DOC_TYPES.get(elem)
        if legacy_int64 and doc_type == "INT64":
            doc_type = "INT32"
        if doc_type and row["types"] and doc_type not in row["types"]:
            issues.append(LintIssue(severity, name, node.op_type,
                                    f"{node.op_type} on {doc_type} is not supported by TensorRT {version} (types: {', '.join(row['types'])})"))
        index = needs_constant(node.op_type, version)
        if index is not None and len(node.input) > index and node.input[index] and node.input[index] not in constants:
            issues.append(LintIssue(severity, name, node.op_type,
                                    f"input {index} of {node.op_type} is computed, but TensorRT {version} needs it constant "
                                    f"({row['restrictions'] or 'axes must be an initializer'})"))
    return issues


ORT_CONTRIB_DOMAIN = "com.microsoft"


def _attr(node: onnx.NodeProto, name: str, default: int | None = None) -> int | None:
    return next((a.i for a in node.attribute if a.name == name), default)


def _check_dequantize(nodes, inits: dict[str, onnx.TensorProto], types: dict[str, int], version: str) -> list[LintIssue]:
    """The parser's own rules for DequantizeLinear beyond its operator-table row."""
    issues = []
    for node in nodes:
        if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx"):
            name = node.name or node.output[0]
            issues += [LintIssue(severity, name, node.op_type, message)
                       for severity, message in _dequantize_problems(node, nodes, inits, types, version)]
    return issues


def _dequantize_problems(node: onnx.NodeProto, nodes, inits: dict[str, onnx.TensorProto], types: dict[str, int],
                         version: str) -> list[tuple[str, str]]:
    found = []
    x = inits.get(node.input[0])
    scale = inits.get(node.input[1]) if len(node.input) > 1 else None
    zero = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    x_dims = list(x.dims) if x is not None else None
    scale_dims = list(scale.dims) if scale is not None else None
    blocked = bool(_attr(node, "block_size", 0)) or (x_dims is not None and scale_dims is not None
                                                     and len(scale_dims) == len(x_dims) > 1)
    int4 = types.get(node.input[0]) in (TensorProto.INT4, TensorProto.UINT4)
    if blocked and not versions.DQ_INT4_BLOCKED.available(version):
        found.append(("error", f"blocked scales (block_size) parse from TensorRT 10.0; TensorRT {version} takes one "
                               "scale per tensor or per axis: export --weights int8 for it"))
    if blocked and x_dims and scale_dims and any(d % max(s, 1) for d, s in zip(x_dims, scale_dims)):
        found.append(("error", f"blocks do not divide the weight {x_dims} (scales {scale_dims}); "
                               "TensorRT takes whole blocks only"))
    if int4 and x_dims and x_dims[-1] % 2:
        found.append(("error", "TensorRT packs INT4 in pairs: the weight's last dimension must be even"))
    if zero is None and not versions.DQ_OPTIONAL_ZERO_POINT.available(version):
        found.append(("error", f"TensorRT {version}'s parser needs the zero-point input (all zeros)"))
    if zero is not None and np.any(numpy_helper.to_array(zero).astype(np.int32)):
        found.append(("error", "the zero-point is not all zeros: TensorRT takes symmetric quantization only"))
    if scale is not None:
        if scale.data_type != TensorProto.FLOAT and not versions.DQ_HALF_SCALE.available(version):
            found.append(("error", f"TensorRT {version} reads DequantizeLinear scales as FP32; this one is "
                                   f"{TensorProto.DataType.Name(scale.data_type)} (export --dtype fp32)"))
        if not np.all(numpy_helper.to_array(scale).astype(np.float32) > 0):
            found.append(("error", "every scale must be positive (TensorRT rejects zero or negative scales)"))
    if int4 and versions.DQ_INT4_BLOCKED.available(version) and not _feeds_matmul(node, nodes):
        found.append(("warning", "TensorRT documents INT4 as weight-only quantization of GEMM weights; the parser "
                                 "takes this INT4 DequantizeLinear, which feeds no MatMul (the embedding's Gather): "
                                 "build to confirm"))
    return found


def _feeds_matmul(dq: onnx.NodeProto, nodes) -> bool:
    users = [n for n in nodes if dq.output[0] in n.input]
    return bool(users) and all(n.op_type in ("MatMul", "Gemm") for n in users)


def lint_model(model: onnx.ModelProto) -> list[VersionLint]:
    table = support_table()
    types = _value_types(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    constants = _constants(model.graph.node, model.graph.initializer)
    inits = {t.name: t for t in model.graph.initializer}
    functions = {(f.domain, f.name): f for f in model.functions}
    int4 = any(t.data_type in (TensorProto.INT4, TensorProto.UINT4) for t in model.graph.initializer)
    needed_opset = 21 if int4 else 0  # DequantizeLinear takes INT4 from opset 21
    custom = [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    reports = []
    for version, data in table.items():
        issues: list[LintIssue] = []
        if opset > data["max_opset"]:
            advice = (f"export with --opset {data['max_opset']} to be safe" if data["max_opset"] >= needed_opset
                      else f"INT4 weights need opset {needed_opset}")
            issues.append(LintIssue("warning", "(model)", "opset",
                                    f"opset {opset} is above TensorRT {version}'s documented maximum ({data['max_opset']}); "
                                    f"the parser reads op by op, but {advice}"))
        issues += _check_nodes(model.graph.node, constants, types, version, data["ops"], "", "error")
        issues += _check_dequantize(model.graph.node, inits, types, version)
        body_runs = False  # some scan node runs its function body on this version
        for node in custom:
            name = node.name or node.output[0]
            function = functions.get((node.domain, node.op_type))
            if node.domain == ORT_CONTRIB_DOMAIN:
                issues.append(LintIssue("error", name, f"{node.domain}::{node.op_type}",
                                        f"{node.op_type} is an ONNX Runtime contrib op: no TensorRT parses it; "
                                        "export with --weights-format dq for TensorRT"))
                continue
            if f"{node.domain}::{node.op_type}" not in SCAN_OF_PLUGIN:
                issues.append(LintIssue("error", name, f"{node.domain}::{node.op_type}",
                                        f"needs a TensorRT plugin named {node.op_type!r}"))
                continue
            runner = versions.cummax_runner(version, has_function=function is not None)
            if runner in ("aot", "jit"):
                issues.append(LintIssue("note", name, node.op_type,
                                        f"runs the samout-edge {node.op_type} plugin (registered by `samout-edge build`)"
                                        + (", else its function body" if function else "")))
            elif runner == "function":
                body_runs = True
                why = ("TensorRT 10.6's parser prefers the model-local function over a registered plugin "
                       "(plugins win from 10.7)" if versions.QUICK_PLUGINS.available(version)
                       else "no samout-edge plugin before TensorRT 10.6")
                issues.append(LintIssue("note", name, node.op_type, f"runs its local-function body (the native scan): {why}"))
            else:
                reason = ("TensorRT before 9.1 cannot run it (local functions from 9.0, the body's CastLike from 9.1, "
                          "the plugin from 10.6)" if function is not None
                          else "the node has no function body and the samout-edge plugin needs TensorRT 10.6+")
                issues.append(LintIssue("error", name, f"{node.domain}::{node.op_type}",
                                        f"{reason}; export with --lowering native"))
        if custom and versions.LOCAL_FUNCTIONS.available(version):
            for (domain, fname), function in functions.items():
                body_constants = _constants(function.node, [])
                issues += _check_nodes(function.node, body_constants, types, version, data["ops"],
                                       f"{domain}::{fname}/", "error" if body_runs else "warning")
        compatible = not any(i.severity == "error" for i in issues)
        reports.append(VersionLint(version, FIELD.get(version, ""), compatible, data["source"], issues))
    return reports
