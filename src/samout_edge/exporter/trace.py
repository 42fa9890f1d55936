"""torch.export -> one ONNX graph, and that graph made the export's: the trace (each scan
still a placeholder, ``samout_edge::CumMax`` or ``::LinearScan``), then ``finalize``:
the scans lowered (lowering.py), the length guard, the I/O contract pinned, the
quantized weights in their integer form (exporter/quantize.py), the metadata.
Why torch.export and not the TorchScript exporter: docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import onnx
import torch
from torch import nn

from samout_edge import lowering as low
from samout_edge import scan_checks, scans
from samout_edge.artifact import graph
from samout_edge.artifact.manifest import Manifest, graph_metadata
from samout_edge.errors import SamoutError
from samout_edge.exporter import quantize as qz
from samout_edge.models.model import SamOut

if TYPE_CHECKING:
    from samout_edge.exporter.onnx_export import ExportOptions


class ExportWrapper(nn.Module):
    """Flat positional I/O for torch.export: (input_ids, *past) -> (logits, *present)."""

    def __init__(self, model: SamOut, last_only: bool):
        super().__init__()
        self.model = model
        self.last_only = last_only

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor):
        logits, present = self.model(input_ids, graph.unflatten(self.model.spec, list(past)), self.last_only)
        return (logits, *graph.flatten(self.model.spec, present))


def scan_translation(s: scans.Scan) -> Callable[..., Any]:
    """custom_translation_table entry for a registered scan: its torch op
    (``samout_edge::<s.torch_op>``, models/ops.py) -> its placeholder node (``s.op_type``),
    the scan's inputs then ``dim`` as the ``axis`` attribute. The signature is the scan's,
    so the exporter's dispatcher matches inputs and the attribute as for a written one."""
    signature = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in s.inputs]
        + [inspect.Parameter("dim", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int)])

    def translate(*args: Any, **kwargs: Any) -> Any:
        import onnxscript

        bound = signature.bind(*args, **kwargs).arguments
        node = getattr(onnxscript.values.Opset(low.DOMAIN, low.OP_VERSION), s.op_type)
        return node(*(bound[name] for name in s.inputs), axis=bound["dim"])

    translate.__signature__ = signature  # type: ignore[attr-defined]
    translate.__annotations__ = {"dim": int}
    translate.__name__ = translate.__qualname__ = f"translate_{s.torch_op}"
    return translate


def scan_translations() -> dict[Any, Callable[..., Any]]:
    """Every registered scan's translation, keyed by its torch op."""
    return {getattr(torch.ops.samout_edge, s.torch_op).default: scan_translation(s) for s in scans.SCANS.values()}


def trace_to_onnx(model: SamOut, options: ExportOptions, trace_batch: int, trace_seq: int) -> onnx.ModelProto:
    """torch.export + the ONNX translation; cummax nodes are still placeholders."""
    low.register_placeholder_schema()
    config, spec = model.config, model.spec
    dtype = next(model.parameters()).dtype
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("seq", min=1, max=max(options.max_seq, trace_seq))
    ids = torch.randint(1, config.vocab_size, (trace_batch, trace_seq))
    past_seq = torch.export.Dim("past_seq", min=0)  # a KV cache has no length limit
    past, past_shapes = [], []
    for tensor, empty in zip(spec.states(config.num_layers), graph.flatten(spec, model.empty_state(trace_batch))):
        if tensor.grows:  # traced with a few tokens in it (0 and 1 would be specialized)
            past.append(torch.randn(tensor.shape(trace_batch, config.num_heads, config.head_dim, 3), dtype=dtype))
            past_shapes.append({0: batch, tensor.SEQ_AXIS: past_seq})
        else:
            past.append(empty)
            past_shapes.append({0: batch})
    inputs, outputs = graph.graph_io(config, spec, options.dtype, options.logits)
    quiet = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with contextlib.redirect_stdout(quiet), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                ExportWrapper(model, options.logits == "last").eval(),
                (ids, *past),
                dynamo=True,
                opset_version=options.opset,
                input_names=[t.name for t in inputs],
                output_names=[t.name for t in outputs],
                dynamic_shapes=({0: batch, 1: seq}, tuple(past_shapes)),
                custom_translation_table=scan_translations(),
                optimize=True,
                verify=False,
            )
    except Exception as e:
        detail = [line for line in re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(e)).strip().splitlines() if line.strip()]
        raise SamoutError(f"torch.export could not trace the model: {detail[0] if detail else type(e).__name__}") from e
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    model = program.model_proto
    got = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != options.opset:
        raise SamoutError(
            f"the exporter could not convert the graph to opset {options.opset} (it stayed at {got}); "
            f"export with --opset {got}"
        )
    return model


def finalize(model: onnx.ModelProto, manifest: Manifest, static_lengths: dict[int, int],
             quantized: dict[str, qz.QuantizedWeight] | None = None) -> onnx.ModelProto:
    """Lower the scans, pin the I/O contract, store quantized weights in their integer
    form (``quantized``: the grid the traced model's weights were put on), record
    the weights' bytes in the manifest, and make the file self-describing."""
    plan = low.ScanPlan(**manifest.scan)
    elem_type = graph.dtype(manifest.dtype).onnx
    sites = scan_checks.scan_sites(model)  # recorded in the graph: verify checks these very nodes
    low.lower_scans(model, manifest.lowering, plan, static_lengths, elem_type)
    spec = manifest.spec
    if spec.guarded:  # the sequence scan is unrolled for max_seq: past it, NaN (attention has no limit)
        scanned = [t.past for t in spec.states(manifest.config.num_layers) if t.scan]
        scan_checks.guard_length(model, graph.INPUT_IDS, 1, manifest.max_seq, [t.name for t in manifest.outputs],
                                 elem_type, state_inputs=scanned)
    if manifest.opset < 18:
        downgrade_split(model)
    for value, spec in zip(list(model.graph.input) + list(model.graph.output), manifest.inputs + manifest.outputs):
        if value.name != spec.name:
            raise SamoutError(f"exported graph has {value.name!r} where the contract says {spec.name!r}")
        dims = value.type.tensor_type.shape.dim
        for dim, want in zip(dims, spec.shape):
            dim.Clear()
            if isinstance(want, int):
                dim.dim_value = want
            else:
                dim.dim_param = want
    model.producer_name = "samout-edge"
    if quantized:
        report = qz.quantize_graph(model, quantized, manifest.weights.format, manifest.weights.activations)
        manifest.weights.bytes, manifest.weights.float_bytes = report.bytes, report.float_bytes
        # the oldest IR the opset allows (INT4 needs IR 10, opset 21's minimum): runtimes
        # older than this onnx (ONNX Runtime 1.23 on JetPack's Python 3.10) load it
        default_domain = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
        model.ir_version = max(onnx.helper.find_min_ir_version_for(default_domain), 10 if qz.has_int4(model) else 3)
    else:
        manifest.weights.bytes = qz.initializer_bytes(model)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, graph_metadata(manifest))
    scan_checks.record_sites(model, sites)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise SamoutError(f"the exported graph is not valid ONNX: {str(e).splitlines()[0]}") from e
    return model


def downgrade_split(model: onnx.ModelProto) -> None:
    """onnx's version converter leaves Split-18's ``num_outputs`` when going to opset 17;
    below 18 a Split without sizes already means equal parts, so the attribute goes."""
    for node in model.graph.node:
        if node.op_type == "Split" and node.domain in ("", "ai.onnx"):
            keep = [a for a in node.attribute if a.name != "num_outputs"]
            del node.attribute[:]
            node.attribute.extend(keep)
