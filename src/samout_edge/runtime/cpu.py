"""What this CPU makes ONNX Runtime's CPU provider compute: asked of the kernel (getauxval's
hardware capabilities, as MLAS asks them), not of /proc/cpuinfo's text.

On aarch64 with fp16 arithmetic (ARMv8.2 ``asimdhp``: Jetson Orin's Cortex-A78AE) ONNX Runtime
computes an fp16 graph's MatMuls in fp16, accumulating in fp16, where x86 upcasts to fp32; with
the int8 dot product (``asimddp``) its MatMulNBits at accuracy level 4 quantizes activations to int8 (and
may take KleidiAI's kernels, which exports pin off: exporter/quantize.py DISABLE_KLEIDIAI);
without it (Xavier's Carmel: fp16 arithmetic, no dot product; Cortex-A57, ARMv8.0: neither)
MLAS has no int8 kernel and computes those MatMuls in fp32.
"""

from __future__ import annotations

import ctypes
import platform
from dataclasses import asdict, dataclass

AT_HWCAP = 16
HWCAP_FPHP = 1 << 9  # arm64 <asm/hwcap.h>
HWCAP_ASIMDHP = 1 << 10
HWCAP_ASIMDDP = 1 << 20


@dataclass(frozen=True)
class CpuFeatures:
    machine: str
    fp16_arithmetic: bool  # ONNX Runtime computes fp16 graphs in fp16 here
    int8_dot_product: bool  # ... and could take KleidiAI for MatMulNBits with int8 compute
    kernel_family: str  # x86 | arm | fp: what MatMulNBits computes at accuracy level 4 (ACTIVATION_FAMILIES)

    def to_dict(self) -> dict:
        return asdict(self)


def hwcap() -> int:
    """The kernel's AT_HWCAP word (0 where it cannot be read)."""
    try:
        libc = ctypes.CDLL(None)  # the C library this process already has (getauxval is glibc's and musl's)
        libc.getauxval.restype = ctypes.c_ulong
        libc.getauxval.argtypes = [ctypes.c_ulong]
        return int(libc.getauxval(AT_HWCAP))
    except (OSError, AttributeError):
        return 0


def _x86_flags() -> str:
    """x86: the flags line of /proc/cpuinfo (AVX-VNNI / AVX512-VNNI: the int8 dot product), or ''."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def cpu_features() -> CpuFeatures:
    machine = platform.machine().lower()
    if machine not in ("aarch64", "arm64"):
        return CpuFeatures(machine, False, "vnni" in _x86_flags(), "x86")
    caps = hwcap()
    fp16 = bool(caps & HWCAP_FPHP) and bool(caps & HWCAP_ASIMDHP)
    dot = bool(caps & HWCAP_ASIMDDP)  # without it MLAS has no int8 kernel: accuracy level 4 computes in fp32
    return CpuFeatures(machine, fp16, dot, "arm" if dot else "fp")


def cpu_workers() -> tuple[int, int]:
    """(concurrent runner calls, threads per call) for independent calls on the CPU (eval's windows).

    Two single-threaded calls at once keep two cores busy without the per-operator hand-offs
    of one two-threaded call: measured with ONNX Runtime on a shared 2-core machine, 11.1 vs
    11.5 ms per 256-byte window idle and 18.7 vs 27.0 ms with one other busy process. Threads
    do not spin: a waiting thread would take a core from the other call.
    """
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(2, cores)
    return workers, max(1, cores // workers)
