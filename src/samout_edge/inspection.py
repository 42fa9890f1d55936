"""What is in an export (or any .onnx file): I/O, ops, weights, custom nodes."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from samout_edge.artifact.golden import polygraphy_line
from samout_edge.artifact.manifest import (
    META_ARCH,
    META_CONFIG,
    META_DTYPE,
    META_LOWERING,
    META_MAX_SEQ,
    MODEL_FILE,
    is_export_dir,
    read_manifest,
    runtime_notes,
)
from samout_edge.artifact.tokenizer_files import tokenizer_note
from samout_edge.errors import SamoutError
from samout_edge.inlining import runs_in
from samout_edge.lowering import all_nodes
from samout_edge.tensorrt.lint import lint_model

ONNX_TYPE_NAMES = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
    TensorProto.INT64: "int64",
    TensorProto.INT32: "int32",
    TensorProto.BOOL: "bool",
}

MAX_PROTO_BYTES = 2**31
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


@dataclass
class InspectResult:
    path: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    op_histogram: dict[str, int]
    node_count: int
    parameter_count: int
    parameter_bytes: int
    custom_nodes: dict[str, int]  # "domain::op_type" -> count
    functions: list[str]
    opsets: dict[str, int]
    max_seq: int | None
    dtype: str | None
    arch: str | None
    lowering: str | None
    runs_in: str | None
    verification: dict[str, Any] | None = None
    lint: list[dict[str, Any]] | None = None  # one VersionLint per TensorRT version
    extra: dict[str, Any] = field(default_factory=dict)
    runtime_notes: list[str] = field(default_factory=list)  # settings a runtime needs besides the file
    precision: dict[str, Any] | None = None  # fp16 exports: fp32 islands and calibrated peaks
    polygraphy: str | None = None  # the line that checks the export with NVIDIA's Polygraphy
    arch_notes: list[str] = field(default_factory=list)  # the mixer, its window, a hybrid's alpha, the state
    tokenizer: str | None = None  # the tokenizer files transformers loads, or why there are none
    quantization: list[str] = field(default_factory=list)  # the weights in the words export prints (Weights.describe)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_onnx(path: str | Path, load_weights: bool = True) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise SamoutError(f"ONNX file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(1)
    # A ModelProto starts with field 1 (ir_version, a varint: tag 0x08) and is at most 2 GiB (protobuf's limit;
    # larger models keep their weights in external data).
    if size == 0 or size > MAX_PROTO_BYTES or first != b"\x08":
        why = "is empty" if size == 0 else ("is over 2 GiB" if size > MAX_PROTO_BYTES else "does not start like one")
        raise SamoutError(f"{path} is not an ONNX model (it {why})")
    try:
        model = onnx.load(str(path), load_external_data=load_weights)
    except Exception as e:  # protobuf DecodeError and friends
        raise SamoutError(f"cannot parse {path} as ONNX: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not model.graph.node or not model.opset_import:
        raise SamoutError(f"{path} is not an ONNX model with a graph (no nodes or no opset)")
    return model


def value_spec(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in tensor.shape.dim]
    return {"name": value.name, "dtype": ONNX_TYPE_NAMES.get(tensor.elem_type, str(tensor.elem_type)), "shape": shape}


def inspect_path(path: str | Path, lint: bool = True) -> InspectResult:
    path = Path(path)
    if not path.exists():
        raise SamoutError(f"not found: {path}")
    manifest = None
    if path.is_dir():
        if not is_export_dir(path):
            raise SamoutError(f"{path} is not a samout-edge export (no export.json) and not an .onnx file")
        manifest = read_manifest(path)
        model_path = path / MODEL_FILE
    else:
        model_path = path
    model = load_onnx(model_path, load_weights=False)
    meta = {p.key: p.value for p in model.metadata_props}

    nodes = all_nodes(model.graph.node)  # an If's branches included
    histogram = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in nodes)
    custom = Counter(f"{n.domain}::{n.op_type}" for n in nodes if n.domain not in ("", "ai.onnx"))
    count, size = 0, 0
    for init in model.graph.initializer:
        if init.data_type not in FLOAT_TYPES:
            continue  # shape constants, not weights
        n = math.prod(int(d) for d in init.dims)  # Python ints: no int64 overflow on absurd dims
        count += n
        size += n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return InspectResult(
        path=str(path),
        inputs=[value_spec(v) for v in model.graph.input],
        outputs=[value_spec(v) for v in model.graph.output],
        op_histogram=dict(histogram.most_common()),
        node_count=len(nodes),
        parameter_count=count,
        parameter_bytes=size,
        custom_nodes=dict(custom),
        functions=[f"{f.domain}::{f.name}" for f in model.functions],
        opsets={o.domain or "ai.onnx": o.version for o in model.opset_import},
        max_seq=manifest.max_seq if manifest else _int_or_none(meta.get(META_MAX_SEQ)),
        dtype=manifest.dtype if manifest else meta.get(META_DTYPE),
        arch=manifest.arch if manifest else meta.get(META_ARCH),
        lowering=manifest.lowering if manifest else meta.get(META_LOWERING),
        runs_in=runs_in((manifest.lowering if manifest else meta.get(META_LOWERING)) or ""),
        verification=_verification_summary(manifest.verification) if manifest else None,
        extra={"config": manifest.config.to_dict() if manifest else json.loads(meta.get(META_CONFIG, "null"))},
        lint=[r.to_dict() for r in lint_model(model)] if lint else None,
        runtime_notes=runtime_notes(manifest) if manifest else [],
        precision=manifest.precision if manifest else None,
        polygraphy=polygraphy_line(manifest) if manifest else None,
        arch_notes=arch_notes(manifest) if manifest else [],
        tokenizer=tokenizer_note(manifest) if manifest else None,
        quantization=manifest.weights.describe() if manifest else [],
    )


def arch_notes(manifest) -> list[str]:
    """What the arch computes and carries, in words: inspect's answer to 'what is this export'."""
    from samout_edge.artifact import graph
    from samout_edge.artifact.resources import human_bytes

    spec, cfg = manifest.spec, manifest.config
    mixes = [m.doc for m in spec.layers]
    if spec.stack:
        notes = [f"mixers, one per layer: {'; '.join(f'{i}: {mix}' for i, mix in enumerate(mixes))}"]
    else:
        notes = [f"mixer: {mixes[0]}"]
    blend = manifest.blend
    if blend is not None and blend.alpha:
        notes.append(f"alpha per layer ({blend.source}; the weight of cummax): "
                     + ", ".join("-" if a is None else f"{a:.3f}" for a in blend.alpha))
    at = lambda n: human_bytes(graph.state_bytes(cfg, spec, 1, n, manifest.dtype))  # noqa: E731
    growth = "grows with the context" if spec.grows else "constant whatever the context"
    notes.append(f"decode state at batch 1: {at(1024)} at 1k tokens, {at(32768)} at 32k ({growth})")
    for q in manifest.quality:
        cost = "" if q.get("cost_bits_per_byte") is None else f", {q['cost_bits_per_byte']:+.4f} vs PyTorch fp32"
        kl = "" if q.get("kl_from_fp32") is None else f", KL {q['kl_from_fp32']:.4f}"
        notes.append(f"quality (eval --record, {q['measured'][:10]}): {q['bits_per_byte']:.4f} bits per byte on "
                     f"{q['text']} ({q['mode']} of {q['window']}, {q['runner']}){cost}{kl}")
    return notes


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def _verification_summary(verification: dict | None) -> dict | None:
    if not verification:
        return None
    worst: dict[str, float] = {}
    for check in verification.get("checks", []):
        worst[check["output"]] = max(worst.get(check["output"], 0.0), check["max_abs_err"])
    return {"passed": verification.get("passed"), "rtol": verification.get("rtol"), "max_abs_err": worst}
