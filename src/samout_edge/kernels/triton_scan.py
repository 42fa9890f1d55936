"""The scans of scans.py as one Triton kernel template: one read and one write.

The tensor is viewed as [P, L, Q] around the scan axis (contiguous). Each
program owns one p and BLOCK_Q columns and walks L in tiles of BLOCK_L rows:
a tile is loaded once (padded with the scan's identity), scanned in registers
(tl.associative_scan with the scan's combine), joined with the carry from the
previous tile, and stored. ``_scan_tiles`` is that walk, written once; the
combine is the ``LINEAR`` constexpr choice, resolved when Triton compiles, and
each registered scan has a thin entry kernel (KERNELS) with its own pointers:

- ``max`` (cummax_kernel(x, P, L, Q, y)): bit-exact with torch.cummax. Max is
  exact in any float type; values are widened to fp32 only so one kernel serves
  fp32, fp16 and bf16, and narrowing back is exact. NaN propagates.
- ``linear`` (linear_scan_kernel(a, b, P, L, Q, h)): h_t = a_t h_{t-1} + b_t from
  h_{-1} = 0, pairs combined as (a, b) o (a', b') = (a a', a' b + b') in fp32 and
  rounded once to the output dtype; within scans.SCANS["linear"].tolerance.

The same kernels are compiled ahead of time for the TensorRT plugin by
``compile_aot``, a pure function of (scan, dtype, axis, rank, compute capability)
that needs neither TensorRT, nor torch, nor a GPU. Their argument order (inputs,
P, L, Q, output) is the one TensorRT's AOT plugins launch with: input pointers,
the extra scalar arguments, output pointers. torch is imported only by the eager
launchers, so a Jetson without a CUDA torch can still build the plugin.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import triton
import triton.language as tl

from samout_edge.kernels.tiling import aot_block_sizes, block_sizes, split_shape

if TYPE_CHECKING:
    import torch


@triton.jit
def _max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _linear(a, b, a2, b2):
    """scans.linear_combine: (a, b) then (a2, b2)."""
    return a * a2, a2 * b + b2


@triton.jit
def _scan_tiles(in0_ptr, in1_ptr, P, L, Q, out_ptr, BLOCK_L: tl.constexpr, BLOCK_Q: tl.constexpr,
                LINEAR: tl.constexpr):
    """The tile walk every scan shares; LINEAR picks the combine (in1_ptr is read only by linear)."""
    pid = tl.program_id(0)
    q_blocks = tl.cdiv(Q, BLOCK_Q)
    p = pid // q_blocks
    q = (pid % q_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < Q
    base = p.to(tl.int64) * L * Q
    if LINEAR:
        carry = tl.zeros([BLOCK_Q], tl.float32)  # h_{-1} = 0
    else:
        carry = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    for start in range(0, L, BLOCK_L):
        rows = start + tl.arange(0, BLOCK_L)
        offsets = base + rows[:, None].to(tl.int64) * Q + q[None, :]
        mask = (rows[:, None] < L) & q_ok[None, :]
        if LINEAR:  # padded with the identity (1, 0): past L, h stays h_{L-1}
            a = tl.load(in0_ptr + offsets, mask=mask, other=1.0).to(tl.float32)
            b = tl.load(in1_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            decay, h = tl.associative_scan((a, b), 0, _linear)
            scanned = decay * carry[None, :] + h  # the carry (its own decay unused) then the tile
            last = tl.arange(0, BLOCK_L)[:, None] == BLOCK_L - 1
            carry = tl.sum(tl.where(last, scanned, 0.0), 0)
        else:
            tile = tl.load(in0_ptr + offsets, mask=mask, other=float("-inf")).to(tl.float32)
            scanned = _max(tl.associative_scan(tile, 0, _max), carry[None, :])
            carry = tl.reduce(scanned, 0, _max)
        tl.store(out_ptr + offsets, scanned.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def cummax_kernel(x_ptr, P, L, Q, y_ptr, BLOCK_L: tl.constexpr, BLOCK_Q: tl.constexpr):
    _scan_tiles(x_ptr, x_ptr, P, L, Q, y_ptr, BLOCK_L, BLOCK_Q, False)


@triton.jit
def linear_scan_kernel(a_ptr, b_ptr, P, L, Q, h_ptr, BLOCK_L: tl.constexpr, BLOCK_Q: tl.constexpr):
    _scan_tiles(a_ptr, b_ptr, P, L, Q, h_ptr, BLOCK_L, BLOCK_Q, True)


KERNELS = {"max": cummax_kernel, "linear": linear_scan_kernel}  # scans.SCANS name -> its entry kernel


def kernel_for(scan: str):
    try:
        return KERNELS[scan]
    except KeyError:
        raise ValueError(f"no Triton kernel for scan {scan!r}; kernels exist for {', '.join(KERNELS)}") from None


def run_scan(scan: str, inputs: tuple[torch.Tensor, ...], dim: int) -> torch.Tensor:
    """Launch ``scan``'s kernel over same-shaped ``inputs`` along ``dim``; the output has the last input's dtype."""
    import torch

    dim = dim % inputs[0].dim()
    inputs = tuple(t.contiguous() for t in inputs)
    y = torch.empty_like(inputs[-1])
    P, L, Q = split_shape(tuple(y.shape), dim)
    if y.numel() == 0:
        return y
    sms = torch.cuda.get_device_properties(y.device).multi_processor_count if y.is_cuda else 1
    block_l, block_q = block_sizes(P, L, Q, 2 * sms)
    grid = (P * triton.cdiv(Q, block_q),)
    kernel_for(scan)[grid](*inputs, P, L, Q, y, BLOCK_L=block_l, BLOCK_Q=block_q)
    return y


def cummax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The values of torch.cummax(x, dim), computed by cummax_kernel."""
    return run_scan("max", (x,), dim)


def linear_scan(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t along ``dim`` from h_{-1} = 0 (the LinearScan op), by linear_scan_kernel."""
    if a.shape != b.shape:
        raise ValueError(f"the linear scan takes a and b of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return run_scan("linear", (a.to(b.dtype), b), dim)


# --------------------------------------------------------------------------- ahead of time

TRITON_TYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
# What TensorRT passes an AOT plugin kernel, in order: the input pointers, the
# extra scalar args (SymInt32 only: the plugin API has no wider type), the output
# pointers. The kernel's own parameters are declared in exactly this order.
SCALARS = (("P", "i32"), ("L", "i32"), ("Q", "i32"))
SCAN_LAUNCH_ARGS: dict[str, tuple[tuple[str, str], ...]] = {
    "max": (("x_ptr", "ptr"), *SCALARS, ("y_ptr", "ptr")),
    "linear": (("a_ptr", "ptr"), ("b_ptr", "ptr"), *SCALARS, ("h_ptr", "ptr")),
}
LAUNCH_ARGS = SCAN_LAUNCH_ARGS["max"]  # CumMax's
MIN_ASTSOURCE = "Triton 3.3"  # the first with ASTSource(constexprs=...) and the hidden scratch parameters


@dataclass(frozen=True)
class PtxParam:
    name: str
    kind: str  # ptr | i32 | i64 | other:<ptx type>


@dataclass(frozen=True)
class AotKernel:
    """One compiled kernel, as the plugin hands it to TensorRT."""

    name: str
    ptx: str
    num_warps: int
    shared: int
    params: list[PtxParam]  # the PTX entry's parameters after stripping: exactly the scan's launch args
    block_l: int
    block_q: int
    arch: int  # sm_XX as an int: 87, 90, 110
    stripped: list[PtxParam] = field(default_factory=list)  # Triton's hidden parameters we removed


def arch_of(compute_capability: str | int) -> int:
    """'8.7' -> 87, '11.0' -> 110, 90 -> 90: Triton's GPUTarget arch."""
    if isinstance(compute_capability, int):
        return compute_capability
    major, _, minor = str(compute_capability).partition(".")
    if not (major.isdigit() and (minor.isdigit() or minor == "")):
        raise ValueError(f"not a compute capability: {compute_capability!r}")
    return int(major) * 10 + int(minor or 0)


_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\((.*?)\)", re.S)
_PARAM = re.compile(r"\.param\s+(.+)\s+(\w+)$")


def _kind(ptx_type: str) -> str:
    words = ptx_type.split()
    if ".ptr" in words:
        return "ptr"
    if words and words[0] in (".u32", ".s32", ".b32"):
        return "i32"
    if words and words[0] in (".u64", ".s64", ".b64"):
        return "i64"
    return "other:" + " ".join(words)


def ptx_params(ptx: str) -> list[PtxParam]:
    """The .entry parameter list of a one-kernel PTX module."""
    match = _ENTRY.search(ptx)
    if match is None:
        raise ValueError("no .entry in the PTX")
    params = []
    for line in match.group(2).split(","):
        param = _PARAM.search(line.strip())
        if param is None:
            raise ValueError(f"unexpected PTX parameter declaration: {line.strip()!r}")
        params.append(PtxParam(param.group(2), _kind(param.group(1))))
    return params


def strip_hidden_params(ptx: str, keep: int) -> tuple[str, list[PtxParam]]:
    """Drop the parameters after the first ``keep`` from the .entry, if the body never uses them.

    Triton 3.3+ appends hidden pointer parameters to every kernel (global_scratch,
    and from 3.5 profile_scratch). TensorRT launches an AOT plugin kernel with
    inputs, extra args and outputs only, so the PTX must declare exactly those;
    a kernel that reads a hidden parameter cannot be launched that way, and this
    refuses it.
    """
    match = _ENTRY.search(ptx)
    if match is None:
        raise ValueError("no .entry in the PTX")
    params = ptx_params(ptx)
    extra = params[keep:]
    if not extra:
        return ptx, []
    outside = ptx[: match.start()] + ptx[match.end():]
    used = [p.name for p in extra if re.search(rf"\b{re.escape(p.name)}\b", outside)]
    if used:
        raise ValueError(f"the kernel uses its hidden parameters {used}; TensorRT's AOT launch cannot pass them")
    declared = [line.strip() for line in match.group(2).split(",")][:keep]
    block = "\n" + ",\n".join("\t" + d for d in declared) + "\n"
    start, end = match.span(2)
    return ptx[:start] + block + ptx[end:], extra


def _source(scan: str, signature: dict[str, str], constexprs: dict[str, int]):
    """triton.compiler.ASTSource, whose constexprs keyword exists from Triton 3.3."""
    source_cls = triton.compiler.ASTSource
    if "constexprs" not in inspect.signature(source_cls.__init__).parameters:
        raise RuntimeError(f"Triton {triton.__version__} is too old for the ahead-of-time {scan} scan kernel; "
                           f"it needs {MIN_ASTSOURCE} or newer (pip install 'triton>=3.3')")
    return source_cls(fn=kernel_for(scan), signature=signature, constexprs=constexprs)


def tritons_ptx_version(arch: int) -> int | None:
    """The PTX ISA Triton emits for ``arch`` by default (what its bundled ptxas for that
    architecture takes: 8.8 below sm_90, 9.4 from sm_90 in Triton 3.9), or None where
    Triton's internals do not say."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas, ptx_get_version

        tool = get_ptxas(arch) if inspect.signature(get_ptxas).parameters else get_ptxas()
        return int(ptx_get_version(tool.version))
    except Exception:  # the internals moved: compile at what the caller asked
        return None


def compile_aot(dtype: str, axis: int, rank: int, compute_capability: str | int, *,
                static_len: int | None = None, ptx_version: int | None = None, scan: str = "max") -> AotKernel:
    """``scan``'s kernel (KERNELS) as PTX for one GPU, without TensorRT, torch or a GPU.

    ``dtype`` is fp32, fp16 or bf16; the scan runs along ``axis`` of a rank-``rank``
    tensor; ``static_len`` is the axis length when the graph fixes it (the head
    axis), for a tighter tile; ``ptx_version`` (e.g. 85) caps the PTX ISA at what the
    device's driver loads (never above what Triton's own ptxas takes). The PTX declares
    exactly the scan's SCAN_LAUNCH_ARGS (see strip_hidden_params).
    """
    from triton.backends.compiler import GPUTarget

    if dtype not in TRITON_TYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(TRITON_TYPES)}")
    if not 0 <= axis < rank:
        raise ValueError(f"axis {axis} is outside a rank-{rank} tensor")
    arch = arch_of(compute_capability)
    block_l, block_q = aot_block_sizes(static_len)
    ptr = "*" + TRITON_TYPES[dtype]
    kernel = kernel_for(scan)
    launch_args = SCAN_LAUNCH_ARGS[scan]
    signature = {name: ptr if kind == "ptr" else kind for name, kind in launch_args}
    source = _source(scan, signature, {"BLOCK_L": block_l, "BLOCK_Q": block_q})
    default = tritons_ptx_version(arch)
    if ptx_version and default and ptx_version >= default:
        ptx_version = None  # the cap only ever lowers the ISA: Triton's ptxas cannot assemble a newer one
    options = {"ptx_version": ptx_version} if ptx_version else None
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    metadata = compiled.metadata
    scratch = {k: getattr(metadata, k, 0) for k in ("global_scratch_size", "profile_scratch_size")}
    if any(scratch.values()):
        raise RuntimeError(f"{kernel.__name__} needs Triton scratch memory {scratch}, "
                           "which a TensorRT AOT launch cannot give")
    ptx, stripped = strip_hidden_params(compiled.asm["ptx"], len(launch_args))
    params = ptx_params(ptx)
    want = [kind for _, kind in launch_args]
    if [p.kind for p in params] != want:
        raise RuntimeError(f"{kernel.__name__}'s PTX takes {[p.kind for p in params]}, TensorRT launches it with {want}")
    return AotKernel(metadata.name, ptx, metadata.num_warps, metadata.shared, params, block_l, block_q, arch, stripped)
