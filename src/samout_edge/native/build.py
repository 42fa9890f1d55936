"""The native kernels compiled once per machine with its own C compiler, and loaded.

The device has a C compiler (JetPack ships gcc) but no wheel of ours built for it, so the
library is built where it runs, for the CPU it runs on (``-march=native`` / ``-mcpu=native``:
AVX2 and FMA, NEON), and cached under ``$SAMOUT_EDGE_CACHE`` (default
``~/.cache/samout-edge``) by the hash of the source, the compiler, its flags and the
machine: a changed source or another CPU builds again, nothing stale is loaded. The
library is written to a temporary name and renamed into place: a build killed half-way
leaves nothing a later load would take.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from functools import cache
from pathlib import Path

from samout_edge.errors import SamoutError

SOURCE = Path(__file__).with_name("samout.c")
COMPILE_TIMEOUT_S = 120


def cache_dir() -> Path:
    given = os.environ.get("SAMOUT_EDGE_CACHE")
    if given:
        return Path(given) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "samout-edge" / "native"


def compiler() -> str:
    cc = os.environ.get("CC") or "cc"
    found = shutil.which(cc)
    if found is None:
        raise SamoutError(f"the native backend compiles its kernels with this machine's C compiler, and there is none "
                          f"({cc!r} is not on PATH): install one (apt install gcc) or set CC")
    return found


def flags(machine: str | None = None) -> list[str]:
    """-O3 for the CPU this runs on; no -ffast-math: a NaN must stay a NaN (torch.maximum's rule).
    ``$SAMOUT_EDGE_NATIVE_ARCH`` replaces the CPU flag: a cross compiler's target
    (``-mcpu=cortex-a76``), or an older x86 to check its kernels (``-march=haswell``: AVX2,
    ``-march=x86-64``: plain C)."""
    machine = machine or platform.machine()
    native = "-mcpu=native" if machine in ("aarch64", "arm64") else "-march=native"
    return ["-O3", *(os.environ.get("SAMOUT_EDGE_NATIVE_ARCH") or native).split(), "-fopenmp", "-shared", "-fPIC",
            "-std=c11", "-lm"]


def _key(cc: str, args: list[str]) -> str:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[:1]
    cpu = ""
    try:  # the CPU itself: -march=native builds for it
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith(("flags", "Features", "CPU part"))), "")
    except OSError:
        pass
    parts = [SOURCE.read_bytes(), cc.encode(), *(a.encode() for a in args), *(v.encode() for v in version),
             platform.machine().encode(), cpu.encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def build() -> Path:
    """The library for this machine: the cached one, or compiled now."""
    cc, args = compiler(), flags()
    directory = cache_dir()
    target = directory / f"samout-{_key(cc, args)}.so"
    if target.is_file():
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SamoutError(f"cannot create the native kernels' cache {directory}: {e.strerror}") from None
    partial = directory / f".samout-tmp-{os.getpid()}.so"
    try:
        done = subprocess.run([cc, str(SOURCE), "-o", str(partial), *args], capture_output=True, text=True,
                              timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0 and "-fopenmp" in args:  # a compiler without OpenMP (clang without libomp): one thread
            done = subprocess.run([cc, str(SOURCE), "-o", str(partial), *(a for a in args if a != "-fopenmp")],
                                  capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise SamoutError(f"compiling the native kernels failed ({cc}): {first}")
        os.replace(partial, target)
    except subprocess.TimeoutExpired:
        raise SamoutError(f"compiling the native kernels took over {COMPILE_TIMEOUT_S} s ({cc})") from None
    finally:
        partial.unlink(missing_ok=True)
    return target


@cache
def library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build()))
    lib.samout_kernels.restype = ctypes.c_char_p
    lib.samout_threads.restype = ctypes.c_int
    lib.samout_forward.restype = ctypes.c_int
    return lib


def kernels() -> str:
    """Which kernels the library was built with: avx512, avx2, or c (the plain loops, vectorized by the
    compiler for its target: NEON on aarch64)."""
    return library().samout_kernels().decode()


def threaded() -> bool:
    """Whether the library was built with OpenMP (else one thread whatever is asked)."""
    return bool(library().samout_threads())
