"""How an export's weights are stored: export.json's ``weights``, as one type with one check.

kind fp (float, the export's dtype), int8 (one scale per output channel) or int4
(one scale per ``block_size`` inputs, a power of two from 16); format dq
(DequantizeLinear, standard ONNX) or matmulnbits (ONNX Runtime's com.microsoft
MatMulNBits/GatherBlockQuantized), None for fp; bytes: the graph's initializers
(what the weights take on the device) and float_bytes, the same in float; reason:
why this format; ort_session_config: ONNX Runtime session config entries the
runner sets for it; activations: how activations are computed (fp: as the
dtype; int8: MatMulNBits quantizes them too); quantizer: how the weights were
put on the grid (rtn, or gptq with its calibration text); grid: symmetric, or
asymmetric (int4 blocks with a zero-point each).

The one quantization spec: ``Weights.from_options`` builds it once from export's
options (each checked in the CLI's words, every ``auto`` resolved: the format and
why, the embedding table's kind, the quantizer, the block size), ``check_model``
checks what depends on the model's size, the exporter carries the same object into
export.json (adding the bytes, GPTQ's calibration record, int8 activations' bounds),
and ``describe`` gives the words export's summary and inspect both print. Every
consumer reads this type. The tables here (formats, reasons, session configs) are
what the choices resolve to; exporter/quantize.py writes the graph forms,
models/grid.py has the grids.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from samout_edge.artifact.resources import human_bytes
from samout_edge.errors import SamoutError

KINDS = ("fp", "int8", "int4")
FORMATS = ("dq", "matmulnbits")
BITS = {"int8": 8, "int4": 4}
MIN_BLOCK_SIZE = 16  # MatMulNBits and GatherBlockQuantized take powers of two from 16; one rule for every check
# ONNX Runtime's MatMulNBits blocks: a power of two from 16 to 256 (ONNX Runtime 1.23 computes
# blocks of 512 wrong); one scale per row repeats over several such blocks, the same function.
NBITS_BLOCKS = (256, 128, 64, 32, 16)  # largest first
# verify's tolerance by the dtype the graph computes in, relative to each output's scale:
# max|err| <= rtol * max(1, max|reference|). fp32: only accumulation order differs between
# runtimes (seed preset: ~8e-7 seen). fp16 is compared with the fp32 model, so its own rounding
# counts (fp16 eps is 9.8e-4; seed preset: ~1e-3 of the scale seen: a 5x margin).
RTOL = {"fp32": 1e-4, "fp16": 5e-3}
# An fp16 graph computed in fp16 by a runtime that also accumulates in fp16 (ONNX Runtime's MatMuls on an
# aarch64 CPU with fp16 arithmetic, e.g. Jetson Orin): the trained SamOut's fp16 export reached 7.0e-3
# of the scale under QEMU's cortex-a76 (1.4x the 5e-3 above); 1e-2 keeps it at 0.70 of its tolerance.
RTOL_FP16_ARITHMETIC = 1e-2
ACTIVATIONS = ("fp", "int8")  # what a quantized export's MatMuls compute with
GRIDS = ("symmetric", "asymmetric")  # int4 blocks without or with a zero-point each (asymmetric: ONNX Runtime only)
QUANTIZERS = ("rtn", "gptq")  # how the weights were put on the grid: round to nearest, or GPTQ on calibration text
# int8 activations: verify's bounds come from PyTorch emulations of the kernel family (exporter:
# int8_bounds), never from the exported graph's output, and never above these ceilings, whatever
# export.json says. Measured on the trained SamOut (int4, int8 compute): an emulation against itself in
# float64 (the roundings an ulp flips) 0.0034 of the scale, mean KL 2.4e-6; ARM's rounding against x86's
# 0.011, mean KL 3.6e-5 (so each family is checked against its own outputs); a fault of one negated scale
# row in one FFN weight: mean KL 9.6e-5, of 16 rows: 0.10 of the scale, mean KL 1.7e-3.
ACTIVATION_CEILING = {"rtol": 0.06, "kl": 5e-4, "median_kl": 1e-6, "max_kl": 0.01, "disagree": 0.03}
# The kernel families of MatMulNBits at accuracy level 4 (KleidiAI off), each computing its own function:
# x86 (AVX2/AVX-512), arm (NEON with the int8 dot product: ties rounded away from zero), fp (an aarch64 CPU
# without the dot product: fp32, exactly the dequantized model). Measured under QEMU on the tiny preset:
# ONNX Runtime on cortex-a76 is the arm emulation to 3.5e-7 of the scale, on cortex-a57 the fp one to 0.
ACTIVATION_FAMILIES = ("x86", "arm", "fp")
CALIBRATION_WINDOW = 256  # GPTQ: tokens per calibration window (positions matter: a running max grows)
CALIBRATION_TOKENS = 32768  # GPTQ reads at most this many: on the trained SamOut int4, 4k tokens gave a mean KL
# from fp32 of 0.0028, 32k 0.0025, 256k 0.0024 (and 256k took 17 s on the 2-core EPYC)

FORMAT_CHOICES = ("auto", *FORMATS)
# int4 exports keep the embedding table at int8 unless told: a Gather reads one row per token, so
# the table's bits cost file size, not decode time, and at int4 it carried most of the quality
# cost (the earlier trained pair's SamOut, 32 KiB of held-out text: mean KL from fp32 0.0048 with an int4
# table, 0.0027 with int8, for 1.04 vs 1.07 MiB).
EMBEDDING_CHOICES = ("auto", "int8", "int4")
DEFAULT_BLOCK_SIZE = 32
# ... up to 256 here: ONNX Runtime 1.23 (the device side's, Python 3.10) returns garbage from
# MatMulNBits with block_size 512 (8 and 4 bits; measured; 1.32 is right). NBITS_BLOCKS,
# largest first: one scale per row takes the largest dividing it.
MAX_NBITS_BLOCK = 256
# DequantizeLinear takes INT4 and block_size from opset 21; INT8 per-axis from 13.
INT4_OPSET = 21
INT8_OPSET = 13
QUANT_OPSET = 21  # the default opset of a quantized export
SCHEME = ("round-to-nearest, symmetric (zero-point 0), full range [-qmax - 1, qmax], scale = max|w| / d per output "
          "channel (int8) or block (int4), d in [qmax, qmax + 1] with the least squared error")
ASYMMETRIC_SCHEME = ("MatMul weights: round-to-nearest per block on an asymmetric grid, q in [0, 2^bits - 1] with a "
                     "zero-point per block, range [min(w, 0), max(w, 0)] x f, f in [0.8, 1] with the least squared error; "
                     "the embedding table on the symmetric grid")
# What --weights-format auto gives, and why. Measured on seed-preset exports (seed 0),
# ONNX Runtime 1.32 CPU on a 2-core AVX2 EPYC shared with other jobs, so all forms were
# timed interleaved in one process (same load for each; intra-op spinning off): median
# one-token decode of the cummax model at context 256, the dq form with ORT_SESSION_CONFIG
# below as the runner applies it:
#   fp32 9.4 ms | int8: dq 8.8 (x0.93), matmulnbits 58.7 (x6.3) | int4 (block 32): dq 9.5 (x1.01),
#   matmulnbits 6.8 (x0.72)   [softmax, context 1024: fp32 25.3, int8 dq x0.96, int4 matmulnbits x0.90]
AUTO_FORMAT = {"int8": "dq", "int4": "matmulnbits"}
REASONS = {
    "dq": "asked for (--weights-format dq): standard ONNX DequantizeLinear, the file ONNX Runtime and "
          "TensorRT both take",
    "matmulnbits": "asked for (--weights-format matmulnbits): ONNX Runtime's MatMulNBits/GatherBlockQuantized, "
                   "ONNX Runtime only (TensorRT: --weights-format dq)",
    "int8 activations": "--activations int8: ONNX Runtime's MatMulNBits at accuracy level 4 (the inputs quantized "
                        "to int8 per block of each row, integer dot products); ONNX Runtime only. Its other integer "
                        "path, quantize_dynamic's DynamicQuantizeLinear + MatMulInteger, decoded int8 14% faster (seed, "
                        "1.09 vs 1.27 ms) but scales the activations per tensor: one session's values would change "
                        "another's in a served batch, and a batch's outputs would depend on its company",
    "auto": {
        "int8": "auto: dq. On ONNX Runtime 1.32 CPU (seed decode, fp32 9.4 ms) dq measured 8.8 ms (it folds the "
                "dequantized weights to float at load) and matmulnbits 58.7 ms (8-bit MatMulNBits has no fast "
                "fp32-accuracy CPU kernel); the same dq file parses on TensorRT 8.5+. Folded, the weights take "
                "fp32's memory in ONNX Runtime (seed: 149 MB loaded, 94 with --activations int8): on the CPU, "
                "int8 saves memory only with --activations int8",
        "int4": "auto: matmulnbits. On ONNX Runtime 1.32 CPU (seed decode, fp32 9.4 ms) matmulnbits measured 6.8 ms "
                "and dq 9.5 ms; matmulnbits is ONNX Runtime only: for TensorRT 10+ export with --weights-format dq",
    },
}
# ONNX Runtime session config entries an export's runner must set (export.json
# weights.ort_session_config). ONNX Runtime fuses DequantizeLinear -> MatMul into
# MatMulNBits on its own, at accuracy level 4 by default (int8 activations: not the
# verified function); level 1 keeps fp32. Disabling the QDQ fusions instead folds the
# dequantized weights into float at load, measured faster on CPU for both kinds
# (8-bit MatMulNBits computes in fp32 slowly; a DequantizeLinear feeding the Gather
# would dequantize the whole table every call).
ORT_SESSION_CONFIG = {
    "dq": {"session.qdq_matmulnbits_accuracy_level": "1", "session.disable_quant_qdq": "1"},
    "matmulnbits": {},
}
# ONNX Runtime's aarch64 builds run KleidiAI's kernels for MatMulNBits at accuracy level 4 where the
# CPU has the dot product (Orin): they quantize activations per row, not per block as MLAS's own
# kernels do, so they compute another function than the one verified (the trained SamOut int4 with
# int8 compute failed verify at 1.34x its tolerance under QEMU's cortex-a76). The export pins MLAS's
# kernels; x86 builds ignore the key (docs/deploy-jetson.md has the measured cost).
DISABLE_KLEIDIAI = "mlas.disable_kleidiai"


def block_size_ok(block: Any) -> bool:
    return isinstance(block, int) and not isinstance(block, bool) and block >= MIN_BLOCK_SIZE and not block & (block - 1)


@dataclass
class Weights:
    kind: str = "fp"
    block_size: int | None = None
    format: str | None = None
    bytes: int | None = None
    float_bytes: int | None = None
    reason: str | None = None
    scheme: str | None = None
    ort_session_config: dict[str, str] = field(default_factory=dict)
    embedding: str | None = None  # the embedding table's kind where it differs (int4 exports keep it int8)
    activations: str = "fp"  # fp | int8: MatMulNBits quantizes its input to int8 too (accuracy level 4)
    activation_rtol: float | None = None  # int8 activations: verify's tolerance, derived at export (see rtol)
    activation_check: dict[str, Any] | None = None  # int8 activations: what the tolerance was derived from
    # int8 activations: per kernel family, the bounds verify holds ONNX Runtime to: rtol (per output, relative),
    # kl (mean KL of the logits over the golden cases) and disagree (share of rows whose top token differs)
    activation_bounds: dict[str, dict[str, float]] | None = None
    quantizer: str = "rtn"  # rtn | gptq (the same grid and graph forms; gptq rounds knowing the inputs)
    grid: str = "symmetric"  # symmetric | asymmetric (int4 MatMul weights with a zero-point per block)
    calibration: dict[str, Any] | None = None  # gptq: the text it weighed errors on (sha256, tokens, window)

    @property
    def quantized(self) -> bool:
        return self.kind != "fp"

    @property
    def bits(self) -> int | None:
        return BITS.get(self.kind)

    @property
    def embedding_bits(self) -> int | None:
        """The embedding table's bits: a Gather reads one row per token, so its bits cost file size,
        not decode time, and int4 exports keep it at int8 unless told (exports older than the
        field: the kind's own)."""
        return BITS.get(self.embedding or self.kind)

    @property
    def key(self) -> tuple:
        """What makes two exports' weights the same function: kind, block, format, activations,
        and how they were rounded (the quantizer and its calibration text)."""
        return self.kind, self.block_size, self.format, self.embedding, self.activations, self.quantizer, \
            (self.calibration or {}).get("sha256"), self.grid

    def rtol(self, dtype: str, family: str = "x86") -> float:
        """verify's tolerance for an export with these weights in ``dtype``: the PyTorch reference
        applies the same dequantized weights, so quantized weights cost no tolerance. With int8
        activations it emulates the kernel's quantization too, but an ulp's difference upstream
        flips a rounding now and then, and ARM rounds ties apart: the tolerance is the kernel
        ``family``'s bound, derived at export from emulations alone, never above the ceiling."""
        if self.activations == "int8":
            bound = self.bounds(family)["rtol"] if self.activation_bounds else float(self.activation_rtol)
            return max(RTOL[dtype], min(bound, ACTIVATION_CEILING["rtol"]))
        return RTOL[dtype]

    # ------------------------------------------------------------------ the spec, from export's options

    @classmethod
    def from_options(cls, kind: str = "fp", block_size: int | None = None, format: str = "auto",
                     activations: str = "fp", embedding: str = "auto", quantizer: str = "auto",
                     grid: str = "symmetric", *, opset: int = QUANT_OPSET, calibrated: bool = False) -> Weights:
        """The one quantization spec, built once from export's options (``--weights``, ``--block-size``,
        ``--weights-format``, ``--activations``, ``--embedding-weights``, ``--quantizer``,
        ``--weights-grid``; ``calibrated``: a ``--calibration-text`` was given). Each is checked in
        the CLI's words and every ``auto`` resolved; the exporter carries the result to export.json."""
        _check_choices(kind, format, activations, embedding, quantizer, grid, calibrated)
        if kind == "fp":
            if block_size is not None:
                raise SamoutError("--block-size applies to --weights int4 only")
            return cls()
        block = _check_block(kind, block_size, opset)
        fmt, reason = _resolve_format(kind, format, activations)
        if grid == "asymmetric" and fmt == "dq":
            reason += "; asymmetric blocks (zero-points): ONNX Runtime, OpenVINO and onnx.reference, not TensorRT"
        session = dict(ORT_SESSION_CONFIG[fmt])
        if activations == "int8":  # ARM builds: MLAS's NEON kernel, whose rounding verify's bounds are derived for
            session[DISABLE_KLEIDIAI] = "1"
        if quantizer == "auto":
            quantizer = "gptq" if calibrated else "rtn"
        return cls(kind, block, fmt, reason=reason, scheme=SCHEME if grid == "symmetric" else ASYMMETRIC_SCHEME,
                   ort_session_config=session, activations=activations,
                   embedding=None if kind != "int4" else ("int8" if embedding == "auto" else embedding),
                   quantizer=quantizer, grid=grid)

    def check_model(self, hidden_size: int) -> Weights:
        """What depends on the model's size, before any work: int4 blocks that divide the hidden
        size (TensorRT takes only whole ones), and MatMulNBits' blocks (powers of two from 16 to
        256; int8: one dividing the hidden size) for the matmulnbits form."""
        if self.kind == "int4" and hidden_size % self.block_size:
            raise SamoutError(f"--block-size {self.block_size} does not divide the hidden size {hidden_size} "
                              "(TensorRT takes only whole blocks); choose a power of two that divides it")
        if self.format != "matmulnbits":
            return self
        divisible = any(hidden_size % b == 0 for b in NBITS_BLOCKS)
        if self.kind == "int4" and self.block_size not in NBITS_BLOCKS:
            raise SamoutError(f"--weights-format matmulnbits takes --block-size {MIN_BLOCK_SIZE} to {MAX_NBITS_BLOCK} "
                              f"(ONNX Runtime 1.23 computes larger MatMulNBits blocks wrong); got {self.block_size}: "
                              "choose a smaller one, or --weights-format dq")
        if self.kind == "int4" and self.embedding != "int4" and not divisible:
            raise SamoutError(f"the int8 embedding table of an int4 matmulnbits export needs a hidden size divisible "
                              f"by {MIN_BLOCK_SIZE}; this model's is {hidden_size}: use --embedding-weights int4")
        if self.kind == "int8" and not divisible:
            raise SamoutError(f"--weights-format matmulnbits with int8 needs a hidden size divisible by "
                              f"{MIN_BLOCK_SIZE} (MatMulNBits' blocks); this model's is {hidden_size}: use "
                              "--weights-format dq")
        return self

    # ------------------------------------------------------------------ the words

    def describe(self) -> list[str]:
        """These weights in words, the lines export's summary and inspect both print (none for
        float weights): kind, block, format, the embedding table and grid where they differ,
        bytes as stored against the same weights in float, and why this format; how the
        weights were rounded (GPTQ: on what text); int8 activations and verify's bounds."""
        if not self.quantized:
            return []
        block = f", block {self.block_size}" if self.block_size else ""
        table = f", embedding table {self.embedding}" if self.embedding and self.embedding != self.kind else ""
        grid = ", asymmetric grid (a zero-point per MatMul block)" if self.grid == "asymmetric" else ""
        size = "size not recorded" if not self.bytes else f"{human_bytes(self.bytes)} stored"
        if self.bytes and self.float_bytes:
            size += f" ({self.bytes / self.float_bytes:.2f}x of {human_bytes(self.float_bytes)} in float)"
        reason = f"; {self.reason}" if self.reason else ""
        lines = [f"weights: {self.kind}{block}, format {self.format or '?'}{table}{grid}, {size}{reason}"]
        if self.quantizer == "gptq":
            c = self.calibration or {}
            lines.append(f"rounded with GPTQ on {c.get('tokens', 0):,} tokens of the calibration text (sha256 "
                         f"{str(c.get('sha256', '?'))[:12]}): each rounding error spread onto the weights not yet "
                         "rounded, weighed by the text's activations; the same grid, verified exactly")
        if self.activations == "int8":
            lines.append(self.describe_activations())
        return lines

    def describe_activations(self) -> str | None:
        """int8 activations in words (export, inspect and verify print the same): the kernel's
        settings and verify's bounds per CPU kernel family."""
        if self.activations != "int8":
            return None
        head = ("activations: int8 in the MatMuls (MatMulNBits accuracy level 4, KleidiAI off: "
                f"{', '.join(f'{k}={v}' for k, v in self.ort_session_config.items()) or 'no session config'})")
        if not self.activation_bounds:
            return f"{head}; verify's tolerance {self.activation_rtol:g} x max|ref| (measured before the bounds per family)"
        families = {"x86": "x86", "arm": "ARM with the int8 dot product", "fp": "ARM without it: fp32"}
        rows = [f"{families.get(f, f)} {b['rtol']:g} x max|ref|, mean KL {b['kl']:.2g}, top-1 disagreement {100 * b['disagree']:.2g}%"
                for f, b in self.activation_bounds.items()]
        return f"{head}; verify's bounds per CPU kernel family, from emulations of the checkpoint's model " \
               f"(never the graph): {'; '.join(rows)}"

    def bounds(self, family: str) -> dict[str, float]:
        """int8 activations: the ``family``'s bounds, each at most its ceiling (an edited
        export.json cannot loosen verify past them)."""
        recorded = (self.activation_bounds or {}).get(family, {})
        return {k: min(float(recorded.get(k, ceiling)), ceiling) for k, ceiling in ACTIVATION_CEILING.items()}

    def check(self) -> Weights:
        """One validation, one rule per field; SamoutError names the field."""
        if self.kind not in KINDS:
            raise SamoutError(f"export.json: weights kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if (self.kind == "int4") != (self.block_size is not None) or \
                (self.block_size is not None and not block_size_ok(self.block_size)):
            raise SamoutError(f"export.json: weights block_size {self.block_size!r} does not fit kind {self.kind} "
                              f"(int4: a power of two from {MIN_BLOCK_SIZE}; otherwise null)")
        if (self.format is None) != (self.kind == "fp") or (self.format is not None and self.format not in FORMATS):
            raise SamoutError(f"export.json: weights format {self.format!r} does not fit kind {self.kind} "
                              f"({' or '.join(FORMATS)} for int8/int4, null for fp)")
        for name in ("bytes", "float_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise SamoutError(f"export.json: weights {name} must be a positive integer or null, got {value!r}")
        config = self.ort_session_config
        if not isinstance(config, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in config.items()):
            raise SamoutError(f"export.json: weights ort_session_config must map strings to strings, got {config!r}")
        if self.embedding is not None and (self.kind != "int4" or self.embedding not in ("int8", "int4")):
            raise SamoutError(f"export.json: weights embedding {self.embedding!r}: int4 exports only, int8 or int4")
        if self.activations not in ACTIVATIONS:
            raise SamoutError(f"export.json: weights activations {self.activations!r} is not one of "
                              f"{', '.join(ACTIVATIONS)}")
        if self.quantizer not in QUANTIZERS or (self.quantizer == "gptq") != isinstance(self.calibration, dict) \
                or (self.quantizer == "gptq" and self.kind == "fp"):
            raise SamoutError(f"export.json: weights quantizer {self.quantizer!r} is not one of {', '.join(QUANTIZERS)}, "
                              "or does not fit its calibration (gptq: quantized weights and a calibration record)")
        if self.grid not in GRIDS or (self.grid == "asymmetric" and self.kind != "int4"):
            raise SamoutError(f"export.json: weights grid {self.grid!r} is not one of {', '.join(GRIDS)} "
                              "(asymmetric: int4 only)")
        bounds = self.activation_bounds
        if bounds is not None and (self.activations != "int8" or not isinstance(bounds, dict) or any(
                f not in ACTIVATION_FAMILIES or not isinstance(b, dict) or not set(b) <= set(ACTIVATION_CEILING)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in b.values())
                for f, b in bounds.items())):
            raise SamoutError(f"export.json: weights activation_bounds {bounds!r} is malformed (int8 activations: "
                              f"per family of {', '.join(ACTIVATION_FAMILIES)}, {', '.join(ACTIVATION_CEILING)} in [0, 1))")
        if self.activations == "int8":
            rtol = self.activation_rtol
            if self.format != "matmulnbits" or not isinstance(rtol, float) or not 0 < rtol < 1:
                raise SamoutError("export.json: int8 activations need matmulnbits weights and an activation_rtol "
                                  f"between 0 and 1, got format {self.format!r}, activation_rtol {rtol!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Weights:
        """export.json's ``weights`` (null or absent in exports older than the field: float weights)."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise SamoutError(f"export.json: weights must be an object, got {data!r}")
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        if values.get("ort_session_config") is None:
            values.pop("ort_session_config", None)
        try:
            return cls(**values).check()
        except TypeError as e:
            raise SamoutError(f"export.json: weights is malformed ({e})") from None


def _check_choices(kind: str, format: str, activations: str, embedding: str, quantizer: str, grid: str,
                   calibrated: bool) -> None:
    """Each quantization option is one of its choices and applies to what was asked for."""
    choices = {"--weights": (kind, KINDS), "--weights-format": (format, FORMAT_CHOICES),
               "--activations": (activations, ACTIVATIONS), "--embedding-weights": (embedding, EMBEDDING_CHOICES),
               "--weights-grid": (grid, GRIDS), "--quantizer": (quantizer, ("auto", *QUANTIZERS))}
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise SamoutError(f"{flag} {value!r} is not one of: {', '.join(allowed)}")
    if quantizer != "auto" and kind == "fp":
        raise SamoutError(f"--quantizer {quantizer} applies to --weights int8/int4")
    if quantizer == "gptq" and not calibrated:
        raise SamoutError("--quantizer gptq needs --calibration-text FILE: text like what the model will read "
                          "(GPTQ weighs each rounding error by the activations it meets)")
    if activations == "int8" and (kind == "fp" or format == "dq"):
        raise SamoutError("--activations int8 computes the MatMuls with int8 inputs in ONNX Runtime's MatMulNBits: "
                          "it takes --weights int8 or int4 with --weights-format matmulnbits (or auto)")
    if embedding != "auto" and kind != "int4":
        raise SamoutError("--embedding-weights applies to --weights int4 (int8 exports keep the table at int8)")
    if grid == "asymmetric" and kind != "int4":
        raise SamoutError("--weights-grid asymmetric applies to --weights int4 (int8's symmetric grid is already "
                          "within 0.0001 of fp32 in mean KL)")


def _check_block(kind: str, block_size: int | None, opset: int) -> int | None:
    """int4's block size (DEFAULT_BLOCK_SIZE unless given; None for int8) and the opset each kind needs."""
    if kind == "int8":
        if block_size is not None:
            raise SamoutError("--block-size applies to --weights int4 only (int8 has one scale per output channel)")
        if opset < INT8_OPSET:
            raise SamoutError(f"--weights int8 needs --opset {INT8_OPSET} or newer (DequantizeLinear per axis); "
                              f"got {opset}")
        return None
    block = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    if not block_size_ok(block):
        raise SamoutError(f"--block-size must be a power of two, {MIN_BLOCK_SIZE} or more; got {block}")
    if opset < INT4_OPSET:
        raise SamoutError(f"--weights int4 needs --opset {INT4_OPSET} or newer (DequantizeLinear with INT4 and "
                          f"block_size came in opset 21); got --opset {opset}")
    return block


def _resolve_format(kind: str, format: str, activations: str) -> tuple[str, str]:
    """(format, reason) for export.json."""
    if activations == "int8":
        return "matmulnbits", REASONS["int8 activations"]
    if format in FORMATS:
        return format, REASONS[format]
    return AUTO_FORMAT[kind], REASONS["auto"][kind]
