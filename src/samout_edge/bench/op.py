"""`samout-edge bench op`: the cummax op alone, against the memory-bandwidth limit.

cummax reads and writes each element once at best, so a plain copy of the same
bytes is its speed limit. Every candidate is timed in one interleaved loop and
checked bit for bit against torch.cummax.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from samout_edge import lowering as low
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
    fraction_of_copy: float  # copy time / this time: 1.0 is the bandwidth limit
    exact: bool | None  # bit-identical to torch.cummax (None for the copy itself)


@dataclass
class OpReport:
    shape: list[int]
    dtype: str
    axis: int
    max_len: int
    machine: dict[str, Any]
    rows: list[OpRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ort_candidates(shape, dtype, axis, max_len, block) -> dict[str, tuple[str, Any]]:
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
            model = low.standalone_model(lowering, plan, axis, dtype, rank=len(shape))
            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = ort.InferenceSession(model.SerializeToString(), options, providers=[provider])
            out[f"ort:{short} {name}"] = (short, session)
    return out


def bench_op(
    shape: list[int],
    dtype: str = "fp32",
    axis: int = 2,
    max_len: int | None = None,
    block: int = low.DEFAULT_BLOCK,
    budget: Budget | None = None,
    device: str = "auto",
    progress: Progress = no_progress,
) -> OpReport:
    import torch

    from samout_edge.models.ops import FAST_KERNELS
    from samout_edge.runtime.torch_runner import torch_device

    if dtype not in OP_DTYPES:
        raise SamoutError(f"--dtype {dtype!r} is not one of: {', '.join(OP_DTYPES)}")
    if not shape or any(d < 1 for d in shape):
        raise SamoutError(f"--shape needs positive dimensions, got {shape}")
    if not 0 <= axis < len(shape):
        raise SamoutError(f"--axis {axis} is outside the shape's {len(shape)} dimensions")
    check_memory(math.prod(shape) * (2 if dtype == "fp16" else 4) * 8, f"bench op --shape {','.join(map(str, shape))}")
    max_len = max_len or shape[axis]
    if max_len < shape[axis]:
        raise SamoutError(f"--max-len {max_len} is shorter than the axis ({shape[axis]}): the lowering would be wrong")
    budget = budget or Budget(warmup=2, min_repeats=5, max_repeats=30, seconds=2.0)
    device = torch_device(device)
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32

    progress("building candidates", 0, 2)
    x_cpu = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch_dtype)
    x_dev = x_cpu.to(device)
    x_np = x_cpu.numpy()
    want = torch.cummax(x_cpu, axis).values.numpy()
    calls: dict[str, Callable[[], Any]] = {
        f"copy ({device})": lambda: x_dev.clone(),
        f"torch.cummax ({device})": lambda: torch.cummax(x_dev, axis).values,
    }
    devices = {f"copy ({device})": device, f"torch.cummax ({device})": device}
    if device.startswith("cuda"):
        from samout_edge.kernels import enable_fast_cummax

        enable_fast_cummax()
    kernel = FAST_KERNELS.get(torch.device(device).type)
    if kernel is not None:
        calls[f"triton kernel ({device})"] = lambda: kernel(x_dev, axis)
        devices[f"triton kernel ({device})"] = device
    for name, (short, session) in _ort_candidates(shape, dtype, axis, max_len, block).items():
        calls[name] = (lambda s=session: s.run(None, {"x": x_np})[0])
        devices[name] = short

    from samout_edge.runtime.verify import bit_equal

    exact = {}
    for name, call in calls.items():
        if not name.startswith("copy"):
            got = call()
            exact[name] = bit_equal(got.cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got), want)
    progress("timing", 1, 2)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    timings = interleaved(calls, budget, sync)
    nbytes = 2 * x_cpu.numel() * x_cpu.element_size()
    copy_ms = timings[f"copy ({device})"].median_ms
    report = OpReport(list(shape), dtype, axis, max_len, machine.describe(device))
    for name, t in timings.items():
        report.rows.append(OpRow(
            name=name, device=devices[name], median_ms=t.median_ms, p90_ms=t.p90_ms,
            gb_per_s=nbytes / (t.median_ms / 1e3) / 1e9, fraction_of_copy=copy_ms / t.median_ms,
            exact=exact.get(name),
        ))
    progress("done", 2, 2)
    return report


def to_markdown(report: OpReport) -> str:
    lines = [
        f"cummax of {report.shape} {report.dtype} along axis {report.axis} (lowerings unrolled for {report.max_len}) "
        f"on {report.machine['label']}; median of interleaved runs.",
        "",
        "| candidate | median ms | GB/s | fraction of copy | bit-exact |",
        "|---|---|---|---|---|",
    ]
    for r in report.rows:
        exact = "-" if r.exact is None else ("yes" if r.exact else "NO")
        lines.append(f"| {r.name} | {r.median_ms:.3f} | {r.gb_per_s:.1f} | {r.fraction_of_copy:.3f} | {exact} |")
    return "\n".join(lines) + "\n"
