"""`samout-edge bench op`: a scan op alone (cummax, or the linear recurrence), against the memory-bandwidth limit.

A scan reads each input and writes its output once at best, so a plain copy of the
same bytes is its speed limit. Every candidate is timed in one interleaved loop and
checked: cummax bit for bit against torch.cummax, the linear recurrence against its
float64 loop at the scan's tolerance (scans.py), as verify checks it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from samout_edge import lowering as low
from samout_edge import scans
from samout_edge.artifact.resources import check_memory
from samout_edge.bench import machine
from samout_edge.bench.timing import Budget, interleaved
from samout_edge.errors import SamoutError
from samout_edge.progress import Progress, no_progress

OP_DTYPES = ("fp32", "fp16")


@dataclass
class OpRow:
    name: str
    device: str
    median_ms: float
    p90_ms: float
    gb_per_s: float  # bytes read + written per second
    fraction_of_copy: float  # this GB/s / a copy's GB/s: 1.0 is the bandwidth limit
    exact: bool | None  # max: bit-identical to torch.cummax; linear: within the tolerance (None for the copy itself)
    error: float | None = None  # max |got - want| / max(1, |want|) against the reference


@dataclass
class OpReport:
    shape: list[int]
    dtype: str
    axis: int
    max_len: int
    machine: dict[str, Any]
    rows: list[OpRow] = field(default_factory=list)
    scan: str = "max"
    tolerance: float | None = None  # None: bit for bit

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def title(self) -> str:
        what = "cummax" if self.scan == "max" else f"the {self.scan} scan"
        return f"{what} of {self.shape} {self.dtype} along axis {self.axis}"

    @property
    def check_header(self) -> str:
        return "bit-exact" if self.tolerance is None else f"error (<= {self.tolerance:g})"


def _ort_candidates(shape, dtype, axis, max_len, block, scan) -> dict[str, tuple[str, Any]]:
    import onnxruntime as ort

    from samout_edge.runtime.ort_runner import available_providers

    out = {}
    variants = [
        ("native/blocked", "native", low.ScanPlan("blocked", max_len, block)),
        ("native/doubling", "native", low.ScanPlan("doubling", max_len, block)),
        ("custom (function body)", "custom", low.ScanPlan("blocked", max_len, block)),
    ]
    for provider in available_providers():
        short = provider.replace("ExecutionProvider", "").lower()
        if short == "tensorrt":
            continue  # TensorRT EP needs the plugin for custom nodes; the engine path covers it
        for name, lowering, plan in variants:
            model = low.standalone_model(lowering, plan, axis, dtype, rank=len(shape), scan=scan)
            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = ort.InferenceSession(model.SerializeToString(), options, providers=[provider])
            out[f"ort:{short} {name}"] = (short, session)
    return out


def _check_shape(shape: list[int], dtype: str, axis: int, scan: scans.Scan) -> None:
    if dtype not in OP_DTYPES:
        raise SamoutError(f"--dtype {dtype!r} is not one of: {', '.join(OP_DTYPES)}")
    if not shape or any(d < 1 for d in shape):
        raise SamoutError(f"--shape needs positive dimensions, got {shape}")
    if not 0 <= axis < len(shape):
        raise SamoutError(f"--axis {axis} is outside the shape's {len(shape)} dimensions")
    if scan.name != "max" and (len(shape) != 4 or axis != 2):
        raise SamoutError(f"--scan {scan.name} runs along the sequence of [batch, heads, seq, head_dim]: "
                          f"give a 4-dimensional --shape and --axis 2 (got {len(shape)} dimensions, axis {axis})")
    check_memory(math.prod(shape) * (2 if dtype == "fp16" else 4) * 8 * scan.arity,
                 f"bench op --shape {','.join(map(str, shape))}")


def _torch_calls(scan: scans.Scan, inputs: list, axis: int, device: str) -> dict[str, Callable[[], Any]]:
    """torch's own op (cummax) or our eager scan (the linear recurrence), and a Triton kernel where registered."""
    import torch

    from samout_edge.models import ops

    if scan.name == "max":
        x = inputs[0]
        calls = {f"torch.cummax ({device})": lambda: torch.cummax(x, axis).values}
        kernel = ops.FAST_KERNELS.get(torch.device(device).type)
        if kernel is not None:
            calls[f"triton kernel ({device})"] = lambda: kernel(x, axis)
        return calls
    a, b = inputs
    h0 = torch.zeros_like(b[:, :, :1])
    calls = {f"torch blocked scan ({device})": lambda: ops.blocked_linear_scan(a, b, h0)}
    kernel = ops.FAST_LINEAR_KERNELS.get(torch.device(device).type)
    if kernel is not None:
        calls[f"triton kernel ({device})"] = lambda: kernel(a, b, axis)
    return calls


def bench_op(
    shape: list[int],
    dtype: str = "fp32",
    axis: int = 2,
    max_len: int | None = None,
    block: int = low.DEFAULT_BLOCK,
    budget: Budget | None = None,
    device: str = "auto",
    progress: Progress = no_progress,
    scan: str = "max",
) -> OpReport:
    import torch

    from samout_edge.runtime.torch_runner import torch_device

    if scan not in scans.SCANS:
        raise SamoutError(f"--scan {scan!r} is not one of: {', '.join(scans.SCANS)}")
    s = scans.SCANS[scan]
    _check_shape(shape, dtype, axis, s)
    max_len = max_len or shape[axis]
    if max_len < shape[axis]:
        raise SamoutError(f"--max-len {max_len} is shorter than the axis ({shape[axis]}): the lowering would be wrong")
    budget = budget or Budget(warmup=2, min_repeats=5, max_repeats=30, seconds=2.0)
    device = torch_device(device)

    progress("building candidates", 0, 2)
    np_inputs = s.sample(np.random.default_rng(0), tuple(shape), np.float16 if dtype == "fp16" else np.float32)
    on_device = [torch.from_numpy(x).to(device) for x in np_inputs]
    if s.exact:
        want = torch.cummax(torch.from_numpy(np_inputs[0]), axis).values.numpy()
    else:
        want = s.reference(np_inputs, axis)
    if device.startswith("cuda"):
        from samout_edge.kernels import enable_fast_cummax

        enable_fast_cummax()
    first = on_device[0]
    calls: dict[str, Callable[[], Any]] = {f"copy ({device})": lambda: first.clone()}
    calls.update(_torch_calls(s, on_device, axis, device))
    devices = {name: device for name in calls}
    for name, (short, session) in _ort_candidates(shape, dtype, axis, max_len, block, scan).items():
        feed = dict(zip(s.inputs, np_inputs))
        calls[name] = (lambda session=session, feed=feed: session.run(None, feed)[0])
        devices[name] = short

    checks = {name: _check(s, dtype, call(), want) for name, call in calls.items() if not name.startswith("copy")}
    progress("timing", 1, 2)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    timings = interleaved(calls, budget, sync)
    itemsize = np_inputs[0].itemsize
    moved = {name: (2 if name.startswith("copy") else s.arity + 1) * first.numel() * itemsize for name in calls}
    copy_rate = moved[f"copy ({device})"] / timings[f"copy ({device})"].median_ms
    report = OpReport(list(shape), dtype, axis, max_len, machine.describe(device), scan=scan,
                      tolerance=None if s.exact else s.tolerance[dtype])
    for name, t in timings.items():
        exact, error = checks.get(name, (None, None))
        report.rows.append(OpRow(
            name=name, device=devices[name], median_ms=t.median_ms, p90_ms=t.p90_ms,
            gb_per_s=moved[name] / (t.median_ms / 1e3) / 1e9, fraction_of_copy=moved[name] / t.median_ms / copy_rate,
            exact=exact, error=error,
        ))
    progress("done", 2, 2)
    return report


def _check(s: scans.Scan, dtype: str, got: Any, want: np.ndarray) -> tuple[bool, float]:
    """max: bit for bit (error 0 or the gap); linear: error relative to max(1, |h|) within the scan's tolerance."""
    from samout_edge.runtime.verify import bit_equal

    got = got.cpu().numpy() if hasattr(got, "cpu") else np.asarray(got)
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    error = float(np.nan_to_num(diff, nan=np.inf).max()) / max(1.0, float(np.abs(want).max()))
    if s.exact:
        return bit_equal(got, want), error
    return error <= s.tolerance[dtype], error


def to_markdown(report: OpReport) -> str:
    lines = [
        f"{report.title} (lowerings unrolled for {report.max_len}) "
        f"on {report.machine['label']}; median of interleaved runs.",
        "",
        f"| candidate | median ms | GB/s | fraction of copy | {report.check_header} |",
        "|---|---|---|---|---|",
    ]
    for r in report.rows:
        exact = check_cell(report, r)
        lines.append(f"| {r.name} | {r.median_ms:.3f} | {r.gb_per_s:.1f} | {r.fraction_of_copy:.3f} | {exact} |")
    return "\n".join(lines) + "\n"


def check_cell(report: OpReport, row: OpRow) -> str:
    """yes/NO for a bit-for-bit check; the error and yes/NO for a toleranced one."""
    if row.exact is None:
        return "-"
    verdict = "yes" if row.exact else "NO"
    return verdict if report.tolerance is None else f"{row.error:.1e} {verdict}"
