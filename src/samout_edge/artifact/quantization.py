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
asymmetric (int4 blocks with a zero-point each). Every consumer reads this type; the
exporter writes it (exporter/quantize.py has the grid and the graph forms).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

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
