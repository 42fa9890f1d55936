"""SamOut (or its softmax baseline) -> one ONNX graph for prefill and decode.

torch.export traces the model with dynamic batch and sequence; each scan is traced
as a placeholder, ``samout_edge::CumMax`` (cummax) or ``::LinearScan`` (the linear
recurrence), which lowering.py then turns into standard ops (``native``) or a custom
node with a function body (``custom``).
Why torch.export and not the TorchScript exporter: docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import platform
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from torch import nn

from samout_edge import lowering as low
from samout_edge import scan_checks
from samout_edge.artifact import graph
from samout_edge.artifact.arch import Blend, arch_spec
from samout_edge.artifact.config import ModelConfig, check_arch, preset
from samout_edge.artifact.files import check_output_dir, staging_dir, write_json_atomic
from samout_edge.artifact.golden import save_golden
from samout_edge.artifact.manifest import (
    CHECKPOINT_DIR,
    MODEL_FILE,
    Manifest,
    graph_metadata,
    previous_export_files,
    record_file,
)
from samout_edge.artifact.quantization import (
    ACTIVATION_CEILING,
    CALIBRATION_TOKENS,
    CALIBRATION_WINDOW,
    QUANTIZERS,
    RTOL,
)
from samout_edge.artifact.resources import check_memory
from samout_edge.artifact.tokenizer_files import tokenizer_form
from samout_edge.artifact.vocab import VOCAB_FILE, Vocab, check_vocab_fits
from samout_edge.errors import SamoutError
from samout_edge.exporter import precision as fp
from samout_edge.exporter import quantize as qz
from samout_edge.exporter.golden import polygraphy_atol, record_golden
from samout_edge.models.checkpoint import Checkpoint, load_checkpoint, random_checkpoint, save_checkpoint
from samout_edge.models.model import LayerNorm, SamOut, torch_dtype
from samout_edge.models.quantize import (
    apply_weights,
    input_grams,
    quantize_model,
    set_int8_activations,
)
from samout_edge.progress import Progress, no_progress
from samout_edge.runtime.compare import agreement, max_abs_error

if TYPE_CHECKING:
    from samout_edge.runtime.verify import VerifyResult

LOGITS = ("last", "all")
# A trained model's fp16 range is known only on text like what it will read: random ids kept the
# trained softmax's FFN under 16,376 (65,504 / 4) while one window of held-out text took it to 65,942,
# all logits NaN in fp16 arithmetic (issue 30's audit). A preset's random weights have no text.
FP16_NEEDS_TEXT = ("--dtype fp16 of a checkpoint needs --calibration-text FILE (text like what the model will "
                   "read): fp16 ends at 65,504, and random ids do not reach the activations real text does")
# int8 activations: verify's bound on each statistic = max(floor, factor x the kernel emulation's spread against
# itself in float64). The factors cover what ONNX Runtime showed beyond that spread: on the trained SamOut int4
# GPTQ (x86), its largest error 1.5x and its mean KL 3.4x the spread's (the roundings it flips are few, and their
# count varies); the floors serve models whose emulations agree exactly (the tiny preset).
ACTIVATION_MARGINS = {"rtol": (3, 1e-4), "kl": (8, 1e-6), "median_kl": (100, 1e-9), "max_kl": (8, 1e-5),
                      "disagree": (4, 0.002)}
# 18 is the torch.export exporter's own opset; 17 goes through onnx's version
# converter and exists for TensorRT 8.5/8.6 (JetPack 5 and 6.0), which parse up to 17.
MIN_OPSET = 17
DEFAULT_OPSET = 18
# Protobuf cannot hold more than 2 GiB; above this the weights go to model.onnx.data.
EXTERNAL_DATA_THRESHOLD = 1 << 30
EXTERNAL_DATA_FILE = MODEL_FILE + ".data"


@dataclass
class ExportOptions:
    arch: str = "cummax"
    lowering: str = "native"
    scan: str = "auto"  # auto | blocked | doubling
    max_seq: int = 2048
    dtype: str = "fp32"
    logits: str = "last"
    opset: int | None = None  # None: DEFAULT_OPSET, or QUANT_OPSET (21) with quantized weights
    block: int = low.DEFAULT_BLOCK
    decompose_layernorm: bool = False  # for TensorRT 8.5, which has no LayerNormalization
    weights: str = "fp"  # fp | int8 | int4 (exporter/quantize.py)
    block_size: int | None = None  # int4: inputs per scale (default quantize.DEFAULT_BLOCK_SIZE)
    weights_format: str = "auto"  # auto | dq | matmulnbits
    calibration_text: Path | None = None  # fp16: what the fp32 islands must cover; int8/int4: what GPTQ weighs
    hybrid_alpha: float | None = None  # SamOut weights exported as a hybrid: the blend in every layer (0.5)
    activations: str = "fp"  # fp | int8: quantized MatMuls with int8 inputs (MatMulNBits accuracy level 4)
    embedding_weights: str = "auto"  # int4 exports: the embedding table at int8 (auto) or int4
    quantizer: str = "auto"  # rtn | gptq | auto: gptq where --calibration-text is given
    weights_grid: str = "symmetric"  # int4: symmetric | asymmetric (a zero-point per block; ONNX Runtime only)

    def validate(self) -> ExportOptions:
        check_arch(self.arch)
        if self.weights not in qz.KINDS:
            raise SamoutError(f"--weights {self.weights!r} is not one of: {', '.join(qz.KINDS)}")
        if self.opset is None:
            self.opset = DEFAULT_OPSET if self.weights == "fp" else qz.QUANT_OPSET
        choices = {
            "lowering": low.LOWERINGS,
            "scan": ("auto", *low.SCANS),
            "dtype": graph.EXPORT_DTYPES,
            "logits": LOGITS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise SamoutError(f"--{name} {getattr(self, name)!r} is not one of: {', '.join(allowed)}")
        if self.max_seq < 1:
            raise SamoutError(f"--max-seq must be at least 1, got {self.max_seq}")
        if self.opset < MIN_OPSET:
            raise SamoutError(f"--opset must be {MIN_OPSET} or newer, got {self.opset}")
        if self.opset > onnx.defs.onnx_opset_version():
            raise SamoutError(f"--opset {self.opset} is newer than this onnx supports ({onnx.defs.onnx_opset_version()})")
        if self.block < 2:
            raise SamoutError(f"--block must be at least 2, got {self.block}")
        if self.calibration_text is not None and self.dtype != "fp16" and self.weights == "fp":
            raise SamoutError("--calibration-text applies to --dtype fp16 (it chooses the fp32 islands) and to "
                              "--weights int8/int4 (GPTQ rounds the weights knowing its activations)")
        if self.quantizer not in ("auto", *QUANTIZERS):
            raise SamoutError(f"--quantizer {self.quantizer!r} is not one of: auto, {', '.join(QUANTIZERS)}")
        if self.quantizer != "auto" and self.weights == "fp":
            raise SamoutError(f"--quantizer {self.quantizer} applies to --weights int8/int4")
        if self.quantizer == "gptq" and self.calibration_text is None:
            raise SamoutError("--quantizer gptq needs --calibration-text FILE: text like what the model will read "
                              "(GPTQ weighs each rounding error by the activations it meets)")
        if self.quantizer == "auto":
            self.quantizer = "gptq" if self.calibration_text is not None and self.weights != "fp" else "rtn"
        if self.activations == "int8" and self.dtype != "fp32":
            raise SamoutError("--activations int8 is exported and verified at --dtype fp32 (its inputs are quantized "
                              "from fp32 activations)")
        spec = qz.validate(self.weights_spec(), self.opset)
        self.block_size = spec.block_size
        return self

    def weights_spec(self) -> qz.WeightsSpec:
        return qz.WeightsSpec(self.weights, self.block_size, self.weights_format, self.activations,
                              self.embedding_weights, self.quantizer, self.weights_grid)

    def scan_plan(self, config: ModelConfig) -> low.ScanPlan:
        # One plan serves the sequence axis and (in custom exports) the head axis.
        max_len = max(self.max_seq, config.num_heads, 2)
        if self.scan == "auto":
            return low.choose_scan(max_len, self.block)
        return low.ScanPlan(self.scan, max_len, self.block)


@dataclass
class ExportResult:
    directory: Path
    manifest: Manifest
    seconds: float
    model_bytes: int
    verification: VerifyResult | None = None
    timings: dict[str, float] = field(default_factory=dict)


class ExportWrapper(nn.Module):
    """Flat positional I/O for torch.export: (input_ids, *past) -> (logits, *present)."""

    def __init__(self, model: SamOut, last_only: bool):
        super().__init__()
        self.model = model
        self.last_only = last_only

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor):
        logits, present = self.model(input_ids, graph.unflatten(self.model.spec, list(past)), self.last_only)
        return (logits, *graph.flatten(self.model.spec, present))


def _translate_cummax(x, dim: int):
    """custom_translation_table entry: samout_edge::cummax -> the CumMax placeholder."""
    import onnxscript

    return onnxscript.values.Opset(low.DOMAIN, low.OP_VERSION).CumMax(x, axis=dim)


def _translate_linear_scan(a, b, dim: int):
    """custom_translation_table entry: samout_edge::linear_scan -> the LinearScan placeholder."""
    import onnxscript

    return onnxscript.values.Opset(low.DOMAIN, low.OP_VERSION).LinearScan(a, b, axis=dim)


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
                custom_translation_table={torch.ops.samout_edge.cummax.default: _translate_cummax,
                                          torch.ops.samout_edge.linear_scan.default: _translate_linear_scan},
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


def save_model(model: onnx.ModelProto, directory: Path) -> list[str]:
    """Write model.onnx (and model.onnx.data when the weights are large); returns file names."""
    path = directory / MODEL_FILE
    if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=EXTERNAL_DATA_FILE
        )
        return [MODEL_FILE, EXTERNAL_DATA_FILE]
    onnx.save_model(model, str(path))
    return [MODEL_FILE]


def check_target(out: Path, force: bool, checkpoint: str | Path | None) -> Path:
    """Fail before minutes of tracing: the target must be new, empty, an earlier
    export of ours, or (with --force) a directory we only add to."""
    out = check_output_dir(out)
    if out.exists() and not out.is_dir():
        raise SamoutError(f"{out} exists and is a file; choose another -o")
    if out.is_dir() and any(out.iterdir()) and previous_export_files(out) is None and not force:
        raise SamoutError(f"{out} exists and is not a samout-edge export; choose another -o, or pass --force "
                          "to add the export beside what is there (nothing of it is removed)")
    if checkpoint is not None:
        source = Path(checkpoint).resolve()
        if source == out.resolve() or out.resolve() in source.parents:
            raise SamoutError(f"the checkpoint {checkpoint} is inside -o {out}, which the export replaces; "
                              "export to another directory")
    return out


def trace_shape(max_seq: int) -> tuple[int, int]:
    """Example batch and seq for tracing: above 1 (torch.export specializes 0 and 1),
    and not a length verify checks, so verify proves the graph generalizes."""
    return 2, max(2, min(6, max_seq))


def export(
    out: str | Path,
    options: ExportOptions,
    checkpoint: str | Path | None = None,
    preset_name: str | None = None,
    heads: int | None = None,
    seed: int = 0,
    run_verify: bool = True,
    force: bool = False,
    progress: Progress = no_progress,
    vocab: str | Path | None = None,
    made_by: str | None = None,
) -> ExportResult:
    """Export a checkpoint (or a randomly initialised preset) to an artifact directory.

    ``made_by`` names a tool that made the export for itself (bench), in export.json's
    ``extra``: that tool replaces only the exports it made.

    The directory appears whole or not at all: everything is written to a staging
    directory beside it and renamed into place at the end.
    """
    from samout_edge.runtime.verify import verify

    options.validate()
    out = Path(out)
    if (checkpoint is None) == (preset_name is None):
        raise SamoutError("give either a CHECKPOINT or --preset NAME (not both)")
    out = check_target(out, force, checkpoint)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    total = 5 + (1 if run_verify else 0)

    progress("loading checkpoint", 0, total)
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint, heads)
        source = {"kind": "checkpoint", "path": str(Path(checkpoint).absolute()), "sha256": ckpt.sha256}
    else:
        config = preset(preset_name)
        if heads is not None and heads != config.num_heads:
            raise SamoutError(f"--heads {heads} contradicts preset {preset_name!r} ({config.num_heads} heads)")
        ckpt = None
    model_config = ckpt.config if ckpt is not None else config
    if options.dtype == "fp16" and options.calibration_text is None and ckpt is not None:
        raise SamoutError(FP16_NEEDS_TEXT)
    if options.weights != "fp":  # what depends on the model's size, before any work
        qz.validate(options.weights_spec(), options.opset, model_config.hidden_size)
        qz.check_nbits(options.weights_spec(), model_config.hidden_size)
    check_memory(export_memory(model_config, options), f"exporting {options.arch} with --max-seq {options.max_seq}")
    words, form = None, None
    if vocab is not None:  # before any work: a bad vocab file fails the export up front
        words = Vocab.load(vocab)
        check_vocab_fits(words, model_config.vocab_size, "--vocab")
        form = tokenizer_form(words)  # the files transformers loads (or why there are none), checked now
    text_ids, text = None, None
    if options.calibration_text is not None:  # before any work too
        # only what is used: GPTQ's first tokens, fp16's calibration, the golden case's window
        used = max(CALIBRATION_TOKENS, options.max_seq, fp.MAX_CALIBRATION_TOKENS if options.dtype == "fp16" else 0)
        text_ids, text = fp.text_tokens(options.calibration_text, model_config.vocab_size, words, used)

    with staging_dir(out, previous_export_files, force) as stage:
        if ckpt is None:
            save_checkpoint(random_checkpoint(config, seed), stage / CHECKPOINT_DIR)
            ckpt = load_checkpoint(stage / CHECKPOINT_DIR)
            source = {
                "kind": "preset",
                "preset": preset_name,
                "seed": seed,
                "path": CHECKPOINT_DIR,
                "sha256": ckpt.sha256,
            }
        manifest = _manifest(ckpt, options, source)
        if made_by is not None:
            manifest.extra["made_by"] = made_by
        model = ckpt.model(options.arch, torch_dtype(options.dtype), options.hybrid_alpha)
        if model.spec.has("hybrid"):  # what inspect shows: where the model chose cummax
            manifest.blend = Blend.of(blends(model), learned=ckpt.alphas is not None, stated=options.hybrid_alpha)
        for module in model.modules():
            if isinstance(module, LayerNorm):
                module.decompose = options.decompose_layernorm
        quantized = None
        if options.weights != "fp":  # the traced weights are dequantize(quantize(w)): see exporter/quantize.py
            grams = None
            if manifest.weights.quantizer == "gptq":
                progress("GPTQ: the Linears' inputs on the calibration text", 1, total)
                t = time.perf_counter()
                grams = input_grams(ckpt.model(options.arch, alpha=options.hybrid_alpha), text_ids)
                manifest.weights.calibration = {"sha256": text["sha256"], "tokens": min(len(text_ids), CALIBRATION_TOKENS),
                                                "window": CALIBRATION_WINDOW}
            quantized = quantize_model(model, options.weights_spec().bits, options.block_size,
                                       manifest.weights.embedding_bits, grams, options.weights_grid == "asymmetric")
            if grams is not None:
                timings["gptq_s"] = time.perf_counter() - t

        reference = ckpt.model(options.arch, alpha=options.hybrid_alpha)
        if quantized is not None:  # the same dequantized weights the graph holds
            apply_weights(reference, quantized)
            if options.activations == "int8":  # ... and its MatMuls' int8 inputs, as the kernel quantizes them
                set_int8_activations(reference, quantized)
        plan = None
        if options.dtype == "fp16":  # refused here, before any more work, if fp16 cannot hold it
            progress("fp16: calibrating ranges, choosing fp32 islands", 1, total)
            t = time.perf_counter()
            plan = fp.plan_fp16(reference, manifest.max_seq, manifest.trace["seq"], text_ids, text)
            timings["fp16_s"] = time.perf_counter() - t
        progress("recording golden outputs (PyTorch fp32)", 1, total)
        t = time.perf_counter()
        golden = record_golden(reference, manifest, RTOL[manifest.dtype], text_ids)
        timings["golden_s"] = time.perf_counter() - t
        if plan is not None:
            progress("fp16: computing the golden cases in fp16", 1, total)
            t = time.perf_counter()
            manifest.precision = apply_fp16_plan(plan, model, manifest, golden)
            timings["fp16_s"] += time.perf_counter() - t

        progress(f"tracing with torch.export ({options.arch}, {options.dtype})", 2, total)
        t = time.perf_counter()
        proto = trace_to_onnx(model, options, manifest.trace["batch"], manifest.trace["seq"])
        timings["trace_s"] = time.perf_counter() - t

        quantizing = "" if quantized is None else f"; {options.weights} weights ({manifest.weights.format})"
        progress(f"lowering the scans ({options.lowering}, {manifest.scan['scan']} scan{quantizing})", 3, total)
        t = time.perf_counter()
        finalize(proto, manifest, static_lengths={1: ckpt.config.num_heads}, quantized=quantized)
        timings["lower_s"] = time.perf_counter() - t

        progress("writing model.onnx and the golden files", 4, total)
        for name in save_model(proto, stage):
            record_file(stage, manifest, name)
        if options.activations == "int8":
            progress("int8 activations: the kernel's emulations, for verify's bounds", 4, total)
            w = manifest.weights
            w.activation_rtol, w.activation_check, w.activation_bounds = int8_bounds(reference, manifest, golden)
            golden.index.atol = polygraphy_atol(w.rtol(manifest.dtype), golden.outputs)
        if words is not None:
            write_json_atomic(stage / VOCAB_FILE, words.to_json())
            record_file(stage, manifest, VOCAB_FILE)
            for name, content in form.files().items():  # for transformers.AutoTokenizer: encodes as vocab.json
                write_json_atomic(stage / name, content)
                record_file(stage, manifest, name)
            manifest.extra["tokenizer"] = {"vocab": form.kind, "files": list(form.files()),
                                           **({"reason": form.reason} if form.reason else {})}
        if source["kind"] == "preset":
            for name in sorted(p.name for p in (stage / CHECKPOINT_DIR).iterdir()):
                record_file(stage, manifest, f"{CHECKPOINT_DIR}/{name}")
        for name in save_golden(stage, golden):
            record_file(stage, manifest, name)
        manifest.golden = golden.index.to_dict()
        manifest.save(stage)

        result = ExportResult(out, manifest, 0.0, manifest.files[MODEL_FILE]["bytes"], timings=timings)
        if run_verify:
            progress("verifying against the golden outputs", 5, total)
            t = time.perf_counter()
            result.verification = verify(stage)
            timings["verify_s"] = time.perf_counter() - t
            manifest.verification = result.verification.to_dict()
            manifest.save(stage)
        progress("done", total, total)
    result.seconds = time.perf_counter() - started
    return result


def apply_fp16_plan(plan: fp.Precision, model: SamOut, manifest: Manifest, golden) -> dict:
    """Make the fp16 ``model`` right in fp16 arithmetic (exporter/precision.py): mark the
    calibrated fp32 islands on it, then compute every golden case with it in fp16. If
    that fails, every layer's mix and FFN go to fp32; if even that fails, the export is
    refused in one line. Returns export.json's ``precision``."""
    fp.set_islands(model, plan.fp32_islands)
    last_only = manifest.logits == "last"
    check = fp.check_fp16_arithmetic(model, golden.feeds, golden.outputs, last_only, RTOL["fp16"])
    everything = fp.all_islands(manifest.config.num_layers)
    if not check["passed"] and plan.fp32_islands != everything:
        plan.fp32_islands, plan.widened = everything, True
        fp.set_islands(model, everything)
        check = fp.check_fp16_arithmetic(model, golden.feeds, golden.outputs, last_only, RTOL["fp16"])
    if not check["passed"]:
        raise SamoutError(f"--dtype fp16 cannot be made safe: computed in fp16 with every layer's mix and FFN in fp32, "
                          f"the golden cases are {'non-finite' if not check['finite'] else 'off by'} "
                          f"{check['worst_relative_error']:.2g} of their scale (tolerance {RTOL['fp16']:g}); "
                          "export --dtype fp32")
    plan.pytorch_fp16 = check
    return plan.to_dict()


def emulate(model: SamOut, manifest: Manifest, golden, rounding: str,
            dtype: torch.dtype = torch.float32) -> list[dict[str, np.ndarray]]:
    """``model`` (a quantized reference with int8 activations) on every golden case, its kernel
    emulated with ``rounding`` (models/quantize.py: x86, arm or fp) and computed in ``dtype``:
    logits and state. A case that takes its state from an earlier one takes this emulation's
    own state, as a runner of that family feeds its own back in verify."""
    from samout_edge.models.quantize import activation_rounding

    arch, layers = manifest.spec, manifest.config.num_layers
    past_names, present_names = graph.past_names(arch, layers), graph.present_names(arch, layers)
    model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    outputs: list[dict[str, np.ndarray]] = []
    presents: list[list[torch.Tensor]] = []
    with activation_rounding(rounding), torch.inference_mode():
        for case, feed in zip(golden.index.cases, golden.feeds):
            if case.state_from is None:
                past = [torch.from_numpy(feed[n]).to(dtype) for n in past_names]
            else:
                past = presents[case.state_from]
            logits, present = model(torch.from_numpy(feed[graph.INPUT_IDS]), graph.unflatten(arch, past),
                                    last_only=manifest.logits == "last")
            flat = graph.flatten(arch, present)
            presents.append(flat)
            out = {graph.LOGITS: logits.float().numpy(), **{n: t.float().numpy() for n, t in zip(present_names, flat)}}
            outputs.append({n: v for n, v in out.items() if n not in case.skipped})
    return outputs


def _spread(reference: list[dict[str, np.ndarray]], other: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """How far ``other`` is from ``reference`` over the golden cases: the largest relative error
    of any output, and the logits' mean KL and top-1 disagreement."""
    worst = 0.0
    for want, got in zip(reference, other):
        for name, ref in want.items():
            err, scale = max_abs_error(ref, got[name])
            worst = max(worst, err / max(1.0, scale))
    agree = agreement(reference, other)
    return {"rtol": worst, "kl": agree.kl, "median_kl": agree.median_kl, "max_kl": agree.max_kl,
            "disagree": 1.0 - agree.top1}


def int8_bounds(reference: SamOut, manifest: Manifest, golden) -> tuple[float, dict, dict]:
    """int8 activations: each kernel family's golden outputs (``golden.family_outputs``: arm, fp;
    the golden outputs are x86's) and verify's bounds for a runner of that family, from PyTorch
    emulations of the checkpoint's quantized model alone, never from the exported graph (a
    wrong graph must not set its own tolerance). Each family's emulation against itself in
    float64 shows the roundings an ulp flips (a kernel's own summation order flips the same);
    the bounds are multiples of its statistics (ACTIVATION_MARGINS), with floors, and never
    above the ceilings (ACTIVATION_CEILING).
    Returns (x86 rtol, what was measured, the bounds per family)."""
    runs = {"x86": golden.outputs}
    runs.update({family: emulate(reference, manifest, golden, family) for family in ("arm", "fp")})
    golden.family_outputs = {family: runs[family] for family in ("arm", "fp")}
    flips, bounds = {}, {}
    for family, outputs in runs.items():
        flips[family] = _spread(outputs, emulate(reference, manifest, golden, family, torch.float64))
        spread = flips[family]
        # at most the ceiling: a model whose kernels' own roundings move it further (random weights: the seed
        # preset's top token changes in 1.8% of rows between ONNX Runtime and its emulation) fails verify, loudly
        bounds[family] = {name: min(ACTIVATION_CEILING[name], max(floor, float(f"{factor * spread[name]:.2g}")))
                          for name, (factor, floor) in ACTIVATION_MARGINS.items()}
    check = {"flips": flips, "x86_vs": {family: _spread(golden.outputs, runs[family]) for family in ("arm", "fp")},
             "rule": "per kernel family, from PyTorch emulations only (never the graph): the family's float32 "
                     "emulation against the same in float64; bound = max(floor, factor x that spread) per statistic "
                     f"(factor, floor: {ACTIVATION_MARGINS}), at most the ceilings {ACTIVATION_CEILING}"}
    return bounds["x86"]["rtol"], check, bounds


def export_memory(config: ModelConfig, options: ExportOptions) -> int:
    """A generous estimate of an export's peak: copies of the fp32 weights (model,
    state_dict, graph, serialization) plus the golden and verification runs at
    max_seq (activations; softmax also its seq x seq scores, unfused in ONNX Runtime)."""
    seq, h = options.max_seq, config.hidden_size
    weights = 4 * config.parameter_count()
    activations = 2 * seq * h * 4 * 24
    spec = arch_spec(options.arch)
    scores = 2 * config.num_heads * seq * (seq + spec.window) * 4 * 3 if spec.attends else 0
    return 5 * weights + activations + scores


def blends(model: SamOut) -> list[float | None]:
    """A hybrid layer's alpha: the weight of cummax in its mix (1 - alpha: softmax); None in a
    stack's other layers."""
    logits = [getattr(layer.self_attention, "alpha_logit", None) for layer in model.decoder_layers]
    return [None if x is None else torch.sigmoid(x.float()).item() for x in logits]


def _manifest(ckpt: Checkpoint, options: ExportOptions, source: dict) -> Manifest:
    inputs, outputs = graph.graph_io(ckpt.config, arch_spec(options.arch), options.dtype, options.logits)
    batch, seq = trace_shape(options.max_seq)
    plan = options.scan_plan(ckpt.config)
    return Manifest(
        arch=options.arch,
        lowering=options.lowering,
        scan={"scan": plan.scan, "max_len": plan.max_len, "block": plan.block},
        opset=options.opset,
        dtype=options.dtype,
        logits=options.logits,
        max_seq=options.max_seq,
        config=ckpt.config,
        inputs=inputs,
        outputs=outputs,
        files={},
        source=source,
        trace={"batch": batch, "seq": seq},
        tools=tool_versions(),
        extra={"decompose_layernorm": options.decompose_layernorm},
        weights=qz.weights_entry(options.weights_spec()),
    )


def tool_versions() -> dict[str, str]:
    import onnxruntime
    import onnxscript

    from samout_edge import __version__

    return {
        "samout_edge": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
