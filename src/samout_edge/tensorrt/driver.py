"""The CUDA driver API through ctypes: GPU identity, the driver's PTX limit, and
launching a PTX kernel, with neither torch nor cuda-python.

A Jetson has no CUDA build of torch, but every machine that runs TensorRT has the
driver library (libcuda.so.1; on a Jetson under /usr/lib/aarch64-linux-gnu/nvidia),
and its API is the most stable one CUDA has. Device 0 is the device TensorRT and
Polygraphy use unless CUDA_VISIBLE_DEVICES says otherwise.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from functools import lru_cache

from samout_edge.errors import SamoutError

CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
_LIBRARIES = ("nvcuda.dll",) if sys.platform.startswith("win") else ("libcuda.so.1", "libcuda.so")


@dataclass(frozen=True)
class GpuIdentity:
    gpu: str  # the device name, e.g. "Orin (nvgpu)" or "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "8.7"
    driver_version: int  # CUDA's encoding: 12060 for 12.6

    @property
    def driver_cuda(self) -> str:
        return f"{self.driver_version // 1000}.{self.driver_version % 1000 // 10}"


@lru_cache(maxsize=1)
def _libcuda() -> ctypes.CDLL:
    errors = []
    for name in _LIBRARIES:
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            errors.append(str(e))
    raise SamoutError("no NVIDIA driver here (libcuda could not be loaded); building or running a TensorRT "
                      "engine needs a CUDA GPU")


def _check(status: int, what: str) -> None:
    if status != 0:
        raise SamoutError(f"CUDA driver call {what} failed with error {status}")


def _init() -> ctypes.CDLL:
    lib = _libcuda()
    _check(lib.cuInit(0), "cuInit")
    return lib


def gpu_identity(device: int = 0) -> GpuIdentity:
    """Name, compute capability and driver version of one GPU, as engine.json records them."""
    lib = _init()
    handle = ctypes.c_int()
    _check(lib.cuDeviceGet(ctypes.byref(handle), device), "cuDeviceGet")
    name = ctypes.create_string_buffer(256)
    _check(lib.cuDeviceGetName(name, len(name), handle), "cuDeviceGetName")
    major, minor, version = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    _check(lib.cuDeviceGetAttribute(ctypes.byref(major), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, handle),
           "cuDeviceGetAttribute")
    _check(lib.cuDeviceGetAttribute(ctypes.byref(minor), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, handle),
           "cuDeviceGetAttribute")
    _check(lib.cuDriverGetVersion(ctypes.byref(version)), "cuDriverGetVersion")
    return GpuIdentity(name.value.decode(errors="replace").strip(), f"{major.value}.{minor.value}", version.value)


def max_ptx_version(driver_version: int) -> int:
    """The newest PTX ISA a driver JIT-compiles, as Triton's ptx_version option spells it
    (85 for PTX 8.5): CUDA 12.0-12.5 -> 8.0-8.5, 12.6+ -> minor - 1, 13.x -> 9.x."""
    major, minor = driver_version // 1000, driver_version % 1000 // 10
    if major >= 13:
        return 90 + (major - 13) * 10 + minor
    if major == 12:
        return 80 + minor if minor < 6 else 80 + minor - 1
    if major == 11:
        return 70 + minor
    raise SamoutError(f"CUDA driver {major}.{minor} is too old for the CumMax kernel (needs 11.0+)")


class PtxKernel:
    """A PTX kernel loaded into the current CUDA context, launched on a given stream.

    The JIT plugin path (TensorRT 10.7-10.8) launches the same PTX the AOT path bakes
    into the engine, with the same arguments, so both paths share one ABI.
    """

    def __init__(self, ptx: str, name: str, shared: int):
        self.lib = _libcuda()
        self.module = ctypes.c_void_p()
        _check(self.lib.cuModuleLoadData(ctypes.byref(self.module), ctypes.c_char_p(ptx.encode())),
               "cuModuleLoadData")
        self.function = ctypes.c_void_p()
        _check(self.lib.cuModuleGetFunction(ctypes.byref(self.function), self.module, name.encode()),
               "cuModuleGetFunction")
        self.shared = shared

    def launch(self, grid: int, block: int, stream: int, args: list[ctypes._SimpleCData]) -> None:
        pointers = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
        _check(self.lib.cuLaunchKernel(self.function, grid, 1, 1, block, 1, 1, self.shared, ctypes.c_void_p(stream),
                                       pointers, None), "cuLaunchKernel")
