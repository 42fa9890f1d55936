"""The native kernels compiled once per machine with its own C compiler, and loaded.

The device has a C compiler (JetPack ships gcc) but no wheel of ours built for it, so the
library is built where it runs, for the CPU it runs on (``-march=native`` / ``-mcpu=native``:
AVX2 and FMA, NEON), and cached under ``$SAMOUT_EDGE_CACHE`` (default
``~/.cache/samout-edge``) by the hash of the source, the compiler, its flags and the
machine: a changed source or another CPU builds again, nothing stale is loaded. The
library is written to a temporary name and renamed into place, then the records a load
checks: a build killed half-way leaves nothing a later load would take.
"""

from __future__ import annotations

import ctypes
import os
import platform
from functools import cache
from pathlib import Path

from samout_edge.artifact.capabilities import which
from samout_edge.errors import SamoutError

SOURCE = Path(__file__).with_name("samout.c")
COMPILE_TIMEOUT_S = 120


def cache_dir() -> Path:
    given = os.environ.get("SAMOUT_EDGE_CACHE")
    if given:
        return Path(given) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "samout-edge" / "native"


# subprocess is imported only to compile: loading a cached library runs no program and imports
# neither it, hashlib (OpenSSL) nor shutil, 4 MB of a process that runs an export
# (tests/test_footprint.py). A cached library is found by a CRC of what built it and trusted
# only when its record of that (the source itself and the build's key) matches exactly.


def compiler() -> str:
    cc = os.environ.get("CC") or "cc"
    found = which(cc)
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
    """What the library depends on besides its source: the compiler (the file itself: an upgrade
    changes it), the flags, the machine and the CPU -march=native builds for."""
    real = os.path.realpath(cc)
    stat = os.stat(real)
    cpu = ""
    try:
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith(("flags", "Features", "CPU part"))), "")
    except OSError:
        pass
    return "\n".join([real, f"{stat.st_size} {stat.st_mtime_ns}", " ".join(args), platform.machine(), cpu]) + "\n"


def _publish(path: Path, data: bytes) -> None:
    partial = path.with_name(f".samout-tmp-{os.getpid()}-{path.name}")
    partial.write_bytes(data)
    os.replace(partial, path)


def build() -> Path:
    """The library for this machine: the cached one, or compiled now."""
    import zlib

    cc, args = compiler(), flags()
    source, key = SOURCE.read_bytes(), _key(cc, args)
    directory = cache_dir()
    stem = directory / f"samout-{zlib.crc32(source + key.encode()):08x}"
    target, record_source, record_key = stem.with_suffix(".so"), stem.with_suffix(".c"), stem.with_suffix(".key")
    try:
        if target.is_file() and record_source.read_bytes() == source and record_key.read_text() == key:
            return target
    except OSError:
        pass
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SamoutError(f"cannot create the native kernels' cache {directory}: {e.strerror}") from None
    _compile(cc, args, target)
    _publish(record_source, source)  # the records last: a library without them is built again
    _publish(record_key, key.encode())
    return target


def _compile(cc: str, args: list[str], target: Path) -> None:
    import subprocess

    partial = target.with_name(f".samout-tmp-{os.getpid()}.so")
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
