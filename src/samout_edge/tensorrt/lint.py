"""Will TensorRT parse this graph? Every node checked against the ONNX parser's
documented operator support for the TensorRT versions in the field.

The data (data/tensorrt_onnx_ops.toml) is transcribed from onnx-tensorrt's
docs/operators.md per release; its header names each source. A node fails when
its op is unsupported or unknown for a version, its input dtype is not listed, or
an input the parser needs as a constant (Slice/Pad/Squeeze/Unsqueeze/Reduce axes)
is computed where that version needs a constant. Custom-domain nodes need a
plugin; CumMax nodes also carry a local function body. Which of the two runs, per
version, is versions.cummax_runner (the one versions table).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources

import onnx

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (JetPack 6)
    import tomli as tomllib
from onnx import TensorProto

from samout_edge.artifact.graph import CUMMAX_DOMAIN, CUMMAX_OP
from samout_edge.tensorrt import versions

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
    names.update(n.output[0] for n in nodes if n.op_type == "Constant")
    return names


def _check_nodes(nodes, constants: set[str], types: dict[str, int], version: str, ops: dict, prefix: str,
                 severity: str) -> list[LintIssue]:
    issues = []
    legacy_int64 = not versions.INT64.available(version)  # the 8.x parser casts INT64 to INT32
    for node in nodes:
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


def lint_model(model: onnx.ModelProto) -> list[VersionLint]:
    table = support_table()
    types = _value_types(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    constants = _constants(model.graph.node, model.graph.initializer)
    functions = {(f.domain, f.name): f for f in model.functions}
    custom = [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    reports = []
    for version, data in table.items():
        issues: list[LintIssue] = []
        if opset > data["max_opset"]:
            issues.append(LintIssue("warning", "(model)", "opset",
                                    f"opset {opset} is above TensorRT {version}'s documented maximum ({data['max_opset']}); "
                                    f"the parser reads op by op, but export with --opset {data['max_opset']} to be safe"))
        issues += _check_nodes(model.graph.node, constants, types, version, data["ops"], "", "error")
        body_runs = False  # some CumMax node runs its function body on this version
        for node in custom:
            name = node.name or node.output[0]
            function = functions.get((node.domain, node.op_type))
            if (node.domain, node.op_type) != (CUMMAX_DOMAIN, CUMMAX_OP):
                issues.append(LintIssue("error", name, f"{node.domain}::{node.op_type}",
                                        f"needs a TensorRT plugin named {node.op_type!r}"))
                continue
            runner = versions.cummax_runner(version, has_function=function is not None)
            if runner in ("aot", "jit"):
                issues.append(LintIssue("note", name, node.op_type,
                                        "runs the samout-edge CumMax plugin (registered by `samout-edge build`)"
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
