"""Check an export against PyTorch: the cummax op bit for bit, then the whole model.

- cummax op: the export's lowering alone, on both axes, at every checked length,
  must equal ``torch.cummax`` exactly (max is exact, so any difference is a bug).
- prefill: ONNX Runtime vs PyTorch (fp32) at seq 1, a prime near 100 and max_seq,
  none of them the length the export was traced at.
- decode: prefill N tokens, then K one-token steps feeding each present state
  back as past, against PyTorch on the whole sequence.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from samout_edge.errors import SamoutError
from samout_edge.exporter import lowering as low
from samout_edge.exporter.manifest import Manifest, read_manifest, source_checkpoint
from samout_edge.models.checkpoint import Checkpoint
from samout_edge.progress import Progress, no_progress
from samout_edge.runtime.compare import OutputError, compare_decode, compare_prefill
from samout_edge.runtime.ort_runner import load_ort_runner
from samout_edge.runtime.torch_runner import load_torch_runner

# Tolerance, relative to each output's scale: max|err| <= RTOL * max(1, max|reference|).
# fp32: only accumulation order differs between runtimes (seed preset: ~8e-7 seen).
# fp16 is compared with the fp32 model, so its own rounding counts (fp16 eps is 9.8e-4;
# seed preset: ~1e-3 of the scale seen, so 5e-3 leaves a 5x margin).
RTOL = {"fp32": 1e-4, "fp16": 5e-3}
DECODE_PREFILL = 11
DECODE_STEPS = 4


@dataclass
class VerifyResult:
    passed: bool
    rtol: float
    lengths: list[int]
    op_exact: bool
    checks: list[OutputError] = field(default_factory=list)
    op_checks: list[dict] = field(default_factory=list)
    provider: str = "CPUExecutionProvider"
    seconds: float = 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["rule"] = "max_abs_err <= rtol * max(1, max|reference|), reference = PyTorch fp32"
        return data

    @property
    def worst(self) -> dict[str, float]:
        """Largest error per output group over all checks."""
        out: dict[str, float] = {}
        for c in self.checks:
            out[c.output] = max(out.get(c.output, 0.0), c.max_abs_err)
        return out


def largest_prime_at_most(n: int) -> int | None:
    for p in range(n, 1, -1):
        if all(p % d for d in range(2, int(p**0.5) + 1)):
            return p
    return None


def verify_lengths(max_seq: int, trace_seq: int) -> list[int]:
    """1, a prime near 100, and max_seq; never the traced length where avoidable."""
    prime = largest_prime_at_most(min(100, max_seq))
    if prime == trace_seq:
        prime = largest_prime_at_most(prime - 1)
    return sorted({1, max_seq} | ({prime} if prime else set()))


def bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same shape and the same bits (so -0.0 != 0.0 and NaN payloads count)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_int = {2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    return bool(np.array_equal(a.view(as_int), b.view(as_int)))


def check_op(manifest: Manifest, lengths: list[int]) -> tuple[bool, list[dict]]:
    """The lowering alone must equal torch.cummax bit for bit on both axes."""
    import onnxruntime as ort

    from samout_edge.runtime.ort_runner import quiet_onnxruntime

    quiet_onnxruntime()
    plan = low.ScanPlan(**manifest.scan)
    cfg = manifest.config
    np_dtype = np.float16 if manifest.dtype == "fp16" else np.float32
    rng = np.random.default_rng(1)
    rows = []
    static = cfg.num_heads if manifest.lowering == "native" else None
    for axis, static_len in ((2, None), (1, static)):
        model = low.standalone_model(manifest.lowering, plan, axis, manifest.dtype, opset=manifest.opset, static_len=static_len)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        for length in lengths:
            x = rng.standard_normal((1, cfg.num_heads, length, cfg.head_dim)).astype(np_dtype)
            got = session.run(None, {"x": x})[0]
            want = torch.cummax(torch.from_numpy(x), axis).values.numpy()
            rows.append({"axis": axis, "seq": length, "exact": bit_equal(got, want)})
    return all(r["exact"] for r in rows), rows


def verify(
    directory: str | Path,
    checkpoint: Checkpoint | str | Path | None = None,
    provider: str = "cpu",
    lengths: list[int] | None = None,
    engine: str | None = None,
    progress: Progress = no_progress,
) -> VerifyResult:
    """Verify the export in ``directory`` in ONNX Runtime, or a TensorRT engine of it
    (``directory`` an engine dir, or ``engine`` a profile name); ``lengths`` replaces
    the default sequence lengths."""
    from samout_edge.runtime.trt_runner import is_engine_dir, load_trt_runner, resolve_engine

    directory = Path(directory)
    started = time.perf_counter()
    if engine or is_engine_dir(directory):
        directory, engine_dir = resolve_engine(directory, engine)
        actual = load_trt_runner(engine_dir)
    else:
        actual = load_ort_runner(directory, provider)
    manifest = read_manifest(directory)
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = source_checkpoint(directory, manifest, checkpoint)
    rtol = RTOL[actual.info.dtype]
    limit = actual.info.max_seq
    if lengths:
        bad = [n for n in lengths if not 1 <= n <= limit]
        if bad:
            what = "the export's max_seq" if limit == manifest.max_seq else "the engine's longest prefill"
            raise SamoutError(f"seq {bad[0]} is outside 1..{limit}, {what}")
        lengths = sorted(set(lengths))
    else:
        lengths = verify_lengths(limit, manifest.trace["seq"])
    steps = len(lengths) + 2
    progress("cummax op, bit for bit", 0, steps)
    op_exact, op_rows = check_op(manifest, lengths)

    reference = load_torch_runner(checkpoint, manifest.arch, "fp32", manifest.logits)
    result = VerifyResult(False, rtol, lengths, op_exact, op_checks=op_rows, provider=actual.info.device)
    rng = np.random.default_rng(0)
    vocab = manifest.config.vocab_size
    small_batch = min(2, actual.info.max_batch or 2)
    for i, length in enumerate(lengths, start=1):
        batch = small_batch if length <= 128 else 1
        progress(f"prefill seq={length}", i, steps)
        ids = rng.integers(1, vocab, (batch, length))
        result.checks += compare_prefill(reference, actual, ids, rtol, f"prefill {batch}x{length}")
    prefill = max(1, min(DECODE_PREFILL, limit - DECODE_STEPS))
    total = min(limit, prefill + DECODE_STEPS)
    progress(f"decode {prefill}+{total - prefill}", steps - 1, steps)
    if total > prefill:
        ids = rng.integers(1, vocab, (small_batch, total))
        check = f"decode {small_batch}x({prefill}+{total - prefill})"
        result.checks += compare_decode(reference, actual, ids, prefill, rtol, check)
    result.passed = op_exact and all(c.passed for c in result.checks)
    result.seconds = time.perf_counter() - started
    progress("verified", steps, steps)
    return result
