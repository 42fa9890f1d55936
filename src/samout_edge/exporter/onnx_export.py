"""SamOut (or its softmax baseline) -> a verified export directory, as named stages.

``export`` reads top to bottom: every check that can fail before any work
(``prepare``), then, inside a staging directory that is renamed into place at the
end (artifact/files.py ``staging_dir``: the directory appears whole or not at all),
the model loaded (``load_model``), its weights put on the quantization grid
(``quantize_weights``), the PyTorch reference's golden outputs with fp16's islands
(``record_reference``), the graph traced and lowered (``build_graph``, in trace.py),
the files and export.json written (``write_artifact``) and the export verified
(``verify_artifact``). int8 activations' bounds are in int8_bounds.py, fp16's
islands in precision.py, the graph forms of quantized weights in quantize.py.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch

from samout_edge import lowering as low
from samout_edge.artifact import graph
from samout_edge.artifact.arch import ArchSpec, Blend, arch_spec
from samout_edge.artifact.config import ModelConfig, check_arch, preset
from samout_edge.artifact.files import check_output_dir, staging_dir, write_json_atomic
from samout_edge.artifact.golden import save_golden
from samout_edge.artifact.manifest import (
    CHECKPOINT_DIR,
    MODEL_FILE,
    Manifest,
    previous_export_files,
    record_file,
)
from samout_edge.artifact.quantization import (
    CALIBRATION_TOKENS,
    CALIBRATION_WINDOW,
    QUANT_OPSET,
    RTOL,
    Weights,
)
from samout_edge.artifact.resources import check_memory
from samout_edge.artifact.tokenizer_files import tokenizer_form
from samout_edge.artifact.vocab import VOCAB_FILE, Vocab, check_vocab_fits
from samout_edge.errors import SamoutError
from samout_edge.exporter import precision as fp
from samout_edge.exporter.golden import polygraphy_atol, record_golden
from samout_edge.exporter.int8_bounds import int8_bounds
from samout_edge.exporter.trace import finalize, trace_to_onnx
from samout_edge.models.checkpoint import Checkpoint, load_checkpoint, random_checkpoint, save_checkpoint
from samout_edge.models.model import LayerNorm, SamOut, torch_dtype
from samout_edge.models.quantize import apply_weights, input_grams, quantize_model, set_int8_activations
from samout_edge.native.weights import FILE as NATIVE_FILE
from samout_edge.native.weights import native_tensors, unsupported, write_native
from samout_edge.progress import Progress, no_progress

if TYPE_CHECKING:
    from samout_edge.runtime.verify import VerifyResult

LOGITS = ("last", "all")
# A trained model's fp16 range is known only on text like what it will read: random ids kept the
# trained softmax's FFN under 16,376 (65,504 / 4) while one window of held-out text took it to 65,942,
# all logits NaN in fp16 arithmetic (issue 30's audit). A preset's random weights have no text.
FP16_NEEDS_TEXT = ("--dtype fp16 of a checkpoint needs --calibration-text FILE (text like what the model will "
                   "read): fp16 ends at 65,504, and random ids do not reach the activations real text does")
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
    # the quantization options, as the CLI gives them; validate() makes them one spec, ``quantization``
    weights: str = "fp"  # fp | int8 | int4 (exporter/quantize.py)
    block_size: int | None = None  # int4: inputs per scale (default artifact/quantization.py DEFAULT_BLOCK_SIZE)
    weights_format: str = "auto"  # auto | dq | matmulnbits
    calibration_text: Path | None = None  # fp16: what the fp32 islands must cover; int8/int4: what GPTQ weighs
    hybrid_alpha: float | None = None  # SamOut weights exported as a hybrid: the blend in every layer (0.5)
    activations: str = "fp"  # fp | int8: quantized MatMuls with int8 inputs (MatMulNBits accuracy level 4)
    embedding_weights: str = "auto"  # int4 exports: the embedding table at int8 (auto) or int4
    quantizer: str = "auto"  # rtn | gptq | auto: gptq where --calibration-text is given
    weights_grid: str = "symmetric"  # int4: symmetric | asymmetric (a zero-point per block; ONNX Runtime only)
    native: bool = False  # also native.safetensors, for the native backend (native/weights.py)
    # the one quantization spec (artifact/quantization.py Weights), built by validate(), carried to export.json
    quantization: Weights = field(default_factory=Weights, init=False, repr=False, compare=False)

    def validate(self) -> ExportOptions:
        check_arch(self.arch)
        if self.opset is None:
            self.opset = DEFAULT_OPSET if self.weights == "fp" else QUANT_OPSET
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
        if self.activations == "int8" and self.dtype != "fp32":
            raise SamoutError("--activations int8 is exported and verified at --dtype fp32 (its inputs are quantized "
                              "from fp32 activations)")
        self.quantization = Weights.from_options(
            self.weights, self.block_size, self.weights_format, self.activations, self.embedding_weights,
            self.quantizer, self.weights_grid, opset=self.opset, calibrated=self.calibration_text is not None)
        return self

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> ExportOptions:
        """The options named in ``values`` (a command's parameters, by the same names; a choice
        Enum gives its value), the others at their defaults."""
        names = {f.name for f in fields(cls) if f.init}
        return cls(**{k: getattr(v, "value", v) for k, v in values.items() if k in names})

    @property
    def spec(self) -> ArchSpec:
        """The arch the user named (``arch``), decoded: what the export carries."""
        return arch_spec(self.arch)

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

    def to_dict(self) -> dict[str, Any]:
        """``export --json``: where, how long, the model's bytes, each stage's seconds, export.json."""
        return {"directory": str(self.directory), "seconds": self.seconds, "model_bytes": self.model_bytes,
                "timings": self.timings, "manifest": self.manifest.to_dict()}


@dataclass
class ExportJob:
    """What the stages hand on, in the order they fill it."""

    out: Path
    options: ExportOptions
    progress: Progress
    total: int  # progress steps
    ckpt: Checkpoint | None = None  # None until load_model for a preset (written into the stage)
    config: ModelConfig | None = None
    preset: str | None = None
    words: Any = None  # --vocab: the vocabulary (artifact/vocab.py), and the tokenizer files it gives
    form: Any = None
    text_ids: np.ndarray | None = None  # --calibration-text: its first tokens, and its record
    text: dict | None = None
    source: dict = field(default_factory=dict)
    manifest: Manifest | None = None
    model: SamOut | None = None  # the model traced (the export's dtype, its weights on the grid)
    reference: SamOut | None = None  # fp32 PyTorch with the same weights: the golden outputs
    quantized: dict | None = None  # parameter -> its grid (models/grid.py QuantizedWeight)
    fp16_plan: fp.Precision | None = None
    golden: Any = None
    proto: onnx.ModelProto | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, what: str | None, step: int, timing: str | None = None) -> Iterator[None]:
        """Report ``what`` (unless None) as progress step ``step``; add its seconds to ``timings[timing]``."""
        if what is not None:
            self.progress(what, step, self.total)
        started = time.perf_counter()
        yield
        if timing:
            self.timings[timing] = self.timings.get(timing, 0.0) + time.perf_counter() - started


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
    started = time.perf_counter()
    job = prepare(out, options, checkpoint, preset_name, heads, force, vocab, run_verify, progress)
    with staging_dir(job.out, previous_export_files, force) as stage:
        load_model(job, stage, seed, made_by)
        quantize_weights(job)
        record_reference(job)
        build_graph(job)
        write_artifact(job, stage)
        result = verify_artifact(job, stage, run_verify)
    result.seconds = time.perf_counter() - started
    return result


def prepare(out: str | Path, options: ExportOptions, checkpoint: str | Path | None, preset_name: str | None,
            heads: int | None, force: bool, vocab: str | Path | None, run_verify: bool,
            progress: Progress) -> ExportJob:
    """Everything that can refuse the export, before minutes of work: the options (the
    quantization spec built once), the target, the checkpoint or preset, what depends on
    the model's size, memory, the vocab and its tokenizer files, the calibration text."""
    options.validate()
    if (checkpoint is None) == (preset_name is None):
        raise SamoutError("give either a CHECKPOINT or --preset NAME (not both)")
    job = ExportJob(check_target(Path(out), force, checkpoint), options, progress, 5 + (1 if run_verify else 0))
    progress("loading checkpoint", 0, job.total)
    if checkpoint is not None:
        job.ckpt = load_checkpoint(checkpoint, heads)
        job.config = job.ckpt.config
        job.source = {"kind": "checkpoint", "path": str(Path(checkpoint).absolute()), "sha256": job.ckpt.sha256}
    else:
        job.config, job.preset = preset(preset_name), preset_name
        if heads is not None and heads != job.config.num_heads:
            raise SamoutError(f"--heads {heads} contradicts preset {preset_name!r} ({job.config.num_heads} heads)")
    if options.dtype == "fp16" and options.calibration_text is None and job.ckpt is not None:
        raise SamoutError(FP16_NEEDS_TEXT)
    options.quantization.check_model(job.config.hidden_size)
    if options.native:
        why = unsupported(options.spec, options.dtype, options.quantization, job.config.hidden_size)
        if why is not None:
            raise SamoutError(f"--native: the native backend cannot run this export: {why}")
    check_memory(export_memory(job.config, options), f"exporting {options.arch} with --max-seq {options.max_seq}")
    if vocab is not None:  # a bad vocab file fails the export up front
        job.words = Vocab.load(vocab)
        check_vocab_fits(job.words, job.config.vocab_size, "--vocab")
        job.form = tokenizer_form(job.words)  # the files transformers loads (or why there are none), checked now
    if options.calibration_text is not None:
        # only what is used: GPTQ's first tokens, fp16's calibration, the golden case's window
        used = max(CALIBRATION_TOKENS, options.max_seq, fp.MAX_CALIBRATION_TOKENS if options.dtype == "fp16" else 0)
        job.text_ids, job.text = fp.text_tokens(options.calibration_text, job.config.vocab_size, job.words, used)
    return job


def load_model(job: ExportJob, stage: Path, seed: int, made_by: str | None) -> None:
    """The checkpoint (a preset's random weights written into the stage first), export.json's
    manifest, and the model in the export's dtype, with what inspect shows of a hybrid."""
    options = job.options
    if job.ckpt is None:
        save_checkpoint(random_checkpoint(job.config, seed), stage / CHECKPOINT_DIR)
        job.ckpt = load_checkpoint(stage / CHECKPOINT_DIR)
        job.source = {"kind": "preset", "preset": job.preset, "seed": seed, "path": CHECKPOINT_DIR,
                      "sha256": job.ckpt.sha256}
    job.manifest = manifest = _manifest(job.ckpt, options, job.source)
    if made_by is not None:
        manifest.extra["made_by"] = made_by
    job.model = model = job.ckpt.model(options.arch, torch_dtype(options.dtype), options.hybrid_alpha)
    if model.spec.has("hybrid"):  # what inspect shows: where the model chose cummax
        manifest.blend = Blend.of(blends(model), learned=job.ckpt.alphas is not None, stated=options.hybrid_alpha)
    for module in model.modules():
        if isinstance(module, LayerNorm):
            module.decompose = options.decompose_layernorm


def quantize_weights(job: ExportJob) -> None:
    """Quantized weights: the model traced gets ``dequantize(quantize(w))`` (exporter/quantize.py
    says why), rounded to nearest or with GPTQ on the calibration text's inputs; the fp32
    reference gets the same weights (and int8 activations as the kernel quantizes them)."""
    options, spec = job.options, job.manifest.weights
    job.reference = job.ckpt.model(options.arch, alpha=options.hybrid_alpha)
    if not spec.quantized:
        return
    grams = None
    if spec.quantizer == "gptq":
        with job.stage("GPTQ: the Linears' inputs on the calibration text", 1, "gptq_s"):
            grams = input_grams(job.reference, job.text_ids)  # still the fp32 checkpoint's weights
            spec.calibration = {"sha256": job.text["sha256"], "tokens": min(len(job.text_ids), CALIBRATION_TOKENS),
                                "window": CALIBRATION_WINDOW}
    with job.stage(None, 1, "gptq_s" if grams is not None else None):
        job.quantized = quantize_model(job.model, spec.bits, spec.block_size, spec.embedding_bits, grams,
                                       spec.grid == "asymmetric")
    apply_weights(job.reference, job.quantized)
    if spec.activations == "int8":
        set_int8_activations(job.reference, job.quantized)


def record_reference(job: ExportJob) -> None:
    """The golden outputs of the fp32 reference; for fp16, the fp32 islands planned first (the
    export refused before more work if fp16 cannot hold it) and checked on every golden case."""
    manifest = job.manifest
    if job.options.dtype == "fp16":
        with job.stage("fp16: calibrating ranges, choosing fp32 islands", 1, "fp16_s"):
            job.fp16_plan = fp.plan_fp16(job.reference, manifest.max_seq, manifest.trace["seq"], job.text_ids, job.text)
    with job.stage("recording golden outputs (PyTorch fp32)", 1, "golden_s"):
        job.golden = record_golden(job.reference, manifest, RTOL[manifest.dtype], job.text_ids)
    if job.fp16_plan is not None:
        with job.stage("fp16: computing the golden cases in fp16", 1, "fp16_s"):
            manifest.precision = fp.apply_plan(job.fp16_plan, job.model, manifest, job.golden)


def build_graph(job: ExportJob) -> None:
    """torch.export's trace, then (trace.py ``finalize``) the scans lowered, the contract
    pinned and the quantized weights in their integer form."""
    options, manifest = job.options, job.manifest
    with job.stage(f"tracing with torch.export ({options.arch}, {options.dtype})", 2, "trace_s"):
        job.proto = trace_to_onnx(job.model, options, manifest.trace["batch"], manifest.trace["seq"])
    quantizing = "" if job.quantized is None else f"; {options.weights} weights ({manifest.weights.format})"
    with job.stage(f"lowering the scans ({options.lowering}, {manifest.scan['scan']} scan{quantizing})", 3, "lower_s"):
        finalize(job.proto, manifest, static_lengths={1: job.ckpt.config.num_heads}, quantized=job.quantized)


def write_artifact(job: ExportJob, stage: Path) -> None:
    """model.onnx, int8 activations' bounds, the vocab and tokenizer files, a preset's
    checkpoint, the golden files and export.json, each file recorded with its hash."""
    manifest = job.manifest
    job.progress("writing model.onnx and the golden files", 4, job.total)
    for name in save_model(job.proto, stage):
        record_file(stage, manifest, name)
    if manifest.weights.activations == "int8":
        job.progress("int8 activations: the kernel's emulations, for verify's bounds", 4, job.total)
        w = manifest.weights
        w.activation_rtol, w.activation_check, w.activation_bounds = int8_bounds(job.reference, manifest, job.golden)
        job.golden.index.atol = polygraphy_atol(w.rtol(manifest.dtype), job.golden.outputs)
    if job.options.native:
        params = {name: p.detach().float().numpy() for name, p in job.model.state_dict().items()}
        write_native(stage / NATIVE_FILE, *native_tensors(params, job.quantized))
        record_file(stage, manifest, NATIVE_FILE)
    if job.words is not None:
        write_vocab(job, stage)
    if job.source["kind"] == "preset":
        for name in sorted(p.name for p in (stage / CHECKPOINT_DIR).iterdir()):
            record_file(stage, manifest, f"{CHECKPOINT_DIR}/{name}")
    for name in save_golden(stage, job.golden):
        record_file(stage, manifest, name)
    manifest.golden = job.golden.index.to_dict()
    manifest.save(stage)


def write_vocab(job: ExportJob, stage: Path) -> None:
    """vocab.json, and the files transformers.AutoTokenizer loads to encode as it does."""
    write_json_atomic(stage / VOCAB_FILE, job.words.to_json())
    record_file(stage, job.manifest, VOCAB_FILE)
    for name, content in job.form.files().items():
        write_json_atomic(stage / name, content)
        record_file(stage, job.manifest, name)
    job.manifest.extra["tokenizer"] = {"vocab": job.form.kind, "files": list(job.form.files()),
                                       **({"reason": job.form.reason} if job.form.reason else {})}


def verify_artifact(job: ExportJob, stage: Path, run_verify: bool) -> ExportResult:
    """The export checked in the stage as a user's verify checks it; the result in export.json."""
    from samout_edge.runtime.verify import verify

    manifest = job.manifest
    result = ExportResult(job.out, manifest, 0.0, manifest.files[MODEL_FILE]["bytes"], timings=job.timings)
    if run_verify:
        with job.stage("verifying against the golden outputs", 5, "verify_s"):
            result.verification = verify(stage)
            if job.options.native and result.verification.passed:  # the native weights checked as they will run
                native = verify(stage, backend="native")
                if not native.passed:
                    result.verification = native
        manifest.verification = result.verification.to_dict()
        manifest.save(stage)
    job.progress("done", job.total, job.total)
    return result


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



def export_memory(config: ModelConfig, options: ExportOptions) -> int:
    """A generous estimate of an export's peak: copies of the fp32 weights (model,
    state_dict, graph, serialization) plus the golden and verification runs at
    max_seq (activations; softmax also its seq x seq scores, unfused in ONNX Runtime)."""
    seq, h = options.max_seq, config.hidden_size
    weights = 4 * config.parameter_count()
    activations = 2 * seq * h * 4 * 24
    spec = options.spec
    scores = 2 * config.num_heads * seq * (seq + spec.window) * 4 * 3 if spec.attends else 0
    return 5 * weights + activations + scores


def blends(model: SamOut) -> list[float | None]:
    """A hybrid layer's alpha: the weight of cummax in its mix (1 - alpha: softmax); None in a
    stack's other layers."""
    logits = [getattr(layer.self_attention, "alpha_logit", None) for layer in model.decoder_layers]
    return [None if x is None else torch.sigmoid(x.float()).item() for x in logits]


def _manifest(ckpt: Checkpoint, options: ExportOptions, source: dict) -> Manifest:
    inputs, outputs = graph.graph_io(ckpt.config, options.spec, options.dtype, options.logits)
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
        weights=options.quantization,
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
