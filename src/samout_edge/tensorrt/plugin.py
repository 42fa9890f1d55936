# ruff: noqa: UP006, UP035 - tensorrt.plugin validates typing.Tuple/List annotations, as in NVIDIA's samples
"""The CumMax TensorRT plugin: a quickly deployable plugin (`tensorrt.plugin`)
running the Triton scan of kernels/triton_cummax.py.

What runs a `--lowering custom` export's CumMax nodes is versions.cummax_runner:
- 10.9 and newer: an ahead-of-time implementation. The kernel is compiled to PTX
  at build time and baked into the engine: no Python at run time, and the engine
  also runs under `trtexec --loadEngine`.
- 10.7 and 10.8: a just-in-time implementation: TensorRT calls back into Python,
  which launches the same PTX through the CUDA driver API (no torch), so the
  engine runs only where this module is imported (our runner does that).
- 9.1 to 10.6: the node's local-function body, the native scan. 10.6 has
  quickly deployable plugins, but its ONNX parser prefers a model-local function
  over a registered plugin of the same name (plugins win from 10.7), so on 10.6
  registering the plugin would change nothing and we do not.
- before 9.1: nothing (9.0 parses local functions but not the body's CastLike);
  export with `--lowering native`.

How TensorRT launches an AOT kernel, and why our PTX declares exactly 5 parameters:
TensorRT passes the input pointers, then the extra scalar arguments the aot_impl
returns (SymInt32 only; the plugin API has no 64-bit or pointer type), then the
output pointers (NVIDIA's samples/python/quickly_deployable_plugins circ_pad
kernel and torch-tensorrt's triton_op document the same order). So cummax_kernel
is declared (x, P, L, Q, y). Triton 3.3+ appends hidden pointer parameters to
every kernel (global_scratch, and from 3.5 profile_scratch): 7 in the PTX of
Triton 3.9. Recent TensorRT pads missing trailing arguments with null, but nothing
guarantees that for every 10.9+ release, and extra args cannot be appended after
the outputs; so compile_aot removes the hidden parameters from the .entry when the
kernel never reads them (its scratch sizes are 0) and checks that the PTX then
declares exactly LAUNCH_ARGS. The PTX ISA is capped at what the device's driver
loads (JetPack 6's CUDA 12.6 driver takes PTX 8.5, JetPack 7's 13.0 takes 9.0;
Triton 3.9 emits 8.8 or 9.4), read from the driver at build time
(SAMOUT_EDGE_PTX_VERSION overrides it). Verified here by assembling that PTX with
ptxas for every shipped profile's GPU (tests/test_tensorrt_static.py); run on a
GPU only where TensorRT is (tests marked `tensorrt`).

The ONNX node is found by op type (CumMax) and its `plugin_namespace` attribute
(samout_edge), which the exporter writes on every CumMax node.
"""

# No `from __future__ import annotations` here: tensorrt.plugin inspects the
# decorated functions' annotations as real types, and rejects strings.
import ctypes
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

from samout_edge.artifact.graph import CUMMAX_PLUGIN_ID
from samout_edge.errors import SamoutError
from samout_edge.tensorrt import versions

if TYPE_CHECKING:
    import tensorrt as trt

PLUGIN_ID = CUMMAX_PLUGIN_ID
PTX_VERSION_ENV = "SAMOUT_EDGE_PTX_VERSION"  # e.g. 85: pin the PTX ISA by hand
_registered: Dict[str, str] = {}  # plugin id -> "aot" | "jit"
_kernels: Dict[Tuple[str, int, int], Any] = {}  # JIT: loaded PtxKernels


# The kernel's scalar parameters, passed as TensorRT "extra args" (SymInt32) between
# the input pointer and the output pointer, in this order.
EXTRA_ARGS = ("P", "L", "Q")


def launch_kinds(num_inputs: int = 1, num_outputs: int = 1) -> List[str]:
    """The argument kinds TensorRT passes an AOT plugin kernel, in order: input
    pointers, the SymInt32 extra args, output pointers (nothing after them)."""
    return ["ptr"] * num_inputs + ["i32"] * len(EXTRA_ARGS) + ["ptr"] * num_outputs


def plugin_kind(tensorrt_version: str) -> Optional[str]:
    """'aot' or 'jit' where our plugin runs CumMax nodes (which carry a function body), else None."""
    runner = versions.cummax_runner(tensorrt_version, has_function=True)
    return runner if runner in ("aot", "jit") else None


def ptx_version_cap(driver_version: int) -> Optional[int]:
    """The PTX ISA to compile for: the env override, else the newest this driver loads."""
    pinned = os.environ.get(PTX_VERSION_ENV)
    if pinned:
        if not pinned.isdigit():
            raise SamoutError(f"{PTX_VERSION_ENV} must be like 85 (PTX 8.5), got {pinned!r}")
        return int(pinned)
    from samout_edge.tensorrt.driver import max_ptx_version

    return max_ptx_version(driver_version)


def _dtype_name(dtype: "trt.DataType") -> str:
    import tensorrt as trt

    names = {trt.float32: "fp32", trt.float16: "fp16"}
    if hasattr(trt, "bfloat16"):
        names[trt.bfloat16] = "bf16"
    if dtype not in names:
        raise SamoutError(f"the CumMax plugin takes fp32, fp16 or bf16, not {dtype}")
    return names[dtype]


def _static(expr: Any) -> Optional[int]:
    """The value of a shape expression the graph fixes, else None."""
    if isinstance(expr, int):
        return expr
    try:
        return int(expr.constant_value) if expr.is_constant else None
    except Exception:  # an expression TensorRT cannot evaluate at build time
        return None


def _product(exprs: List[Any]) -> Any:
    """A symbolic product; the int 1 for no dims."""
    result: Any = 1
    for e in exprs:
        result = e if isinstance(result, int) and result == 1 else result * e
    return result


def register_cummax_plugin(tensorrt_version: str) -> str:
    """Register samout_edge::CumMax with TensorRT's plugin registry (once per process);
    returns 'aot' or 'jit'. Call it before the ONNX parser runs, and before an
    engine built with the JIT plugin is deserialized."""
    kind = plugin_kind(tensorrt_version)
    if kind is None:
        runs = {"function": "their local-function body", "none": "nothing (export with --lowering native)"}
        raise SamoutError(f"TensorRT {tensorrt_version} does not use the CumMax plugin: CumMax nodes run "
                          f"{runs[versions.cummax_runner(tensorrt_version)]} there")
    if PLUGIN_ID in _registered:
        return _registered[PLUGIN_ID]
    versions.import_tensorrt()  # the real module, not the stubs' namespace package
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from samout_edge.tensorrt.driver import gpu_identity

    identity = gpu_identity()
    cap = ptx_version_cap(identity.driver_version)
    types = "FP32|FP16|BF16" if hasattr(trt, "bfloat16") else "FP32|FP16"

    @trtp.register(PLUGIN_ID)
    def cummax_desc(x: trtp.TensorDesc, axis: int) -> trtp.TensorDesc:
        return x.like()

    @trtp.autotune(PLUGIN_ID)
    def cummax_autotune(x: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(f"{types}, {types}", "LINEAR")]

    if kind == "aot":

        @trtp.aot_impl(PLUGIN_ID)
        def cummax_aot(
            x: trtp.TensorDesc, axis: int, outputs: Tuple[trtp.TensorDesc], tactic: int
        ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
            return aot_launch(trtp, x, axis, identity.compute_capability, cap)

    else:

        @trtp.impl(PLUGIN_ID)
        def cummax_jit(x: trtp.Tensor, axis: int, outputs: Tuple[trtp.Tensor], stream: int) -> None:
            jit_launch(x, outputs[0], axis, stream, identity.compute_capability, cap)

    _registered[PLUGIN_ID] = kind
    return kind


def aot_launch(trtp: Any, x: Any, axis: int, compute_capability: str, ptx_version: Optional[int]) -> Tuple[bytes, bytes, Any, Any]:
    """(kernel name, PTX, launch params, extra args) for TensorRT's AOT path.

    Shapes are symbolic at build time: P, L and Q are products of the input's shape
    expressions, resolved by TensorRT at run time, so one engine serves every shape
    in its optimization profiles.
    """
    from samout_edge.kernels.triton_scan import compile_aot

    dims = x.shape_expr
    rank = len(dims)
    axis = axis % rank
    kernel = compile_aot(_dtype_name(x.dtype), axis, rank, compute_capability,
                         static_len=_static(dims[axis]), ptx_version=ptx_version)
    P = _product([dims[i] for i in range(axis)])
    L = dims[axis]
    Q = _product([dims[i] for i in range(axis + 1, rank)])
    q_blocks = -(-Q // kernel.block_q) if isinstance(Q, int) else trtp.cdiv(Q, kernel.block_q)
    launch = trtp.KernelLaunchParams()
    launch.grid_x = q_blocks if isinstance(P, int) and P == 1 else P * q_blocks
    launch.block_x = kernel.num_warps * 32
    launch.shared_mem = kernel.shared
    # Inputs (x), then these extra args in the kernel's order, then outputs (y).
    scalars = {"P": P, "L": L, "Q": Q}
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(scalars[name]) for name in EXTRA_ARGS])
    return kernel.name.encode(), kernel.ptx.encode(), launch, extra


def jit_launch(x: Any, y: Any, axis: int, stream: int, compute_capability: str,
               ptx_version: Optional[int]) -> None:
    """Run the AOT kernel on concrete shapes through the driver API (the JIT path)."""
    from samout_edge.kernels.tiling import aot_block_sizes, split_shape
    from samout_edge.kernels.triton_scan import compile_aot
    from samout_edge.tensorrt.driver import PtxKernel

    shape = tuple(int(d) for d in x.shape)
    axis = axis % len(shape)
    dtype = _dtype_name(x.dtype)
    P, L, Q = split_shape(shape, axis)
    if P * L * Q == 0:
        return
    static_len = L if L <= 64 else None  # a short axis (the heads) gets the tight tile, as in the AOT path
    key = (dtype, *aot_block_sizes(static_len))
    if key not in _kernels:
        aot = compile_aot(dtype, axis, len(shape), compute_capability, static_len=static_len, ptx_version=ptx_version)
        _kernels[key] = (aot, PtxKernel(aot.ptx, aot.name, aot.shared))
    aot, loaded = _kernels[key]
    args = [ctypes.c_uint64(int(x.data_ptr)), ctypes.c_int32(P), ctypes.c_int32(L), ctypes.c_int32(Q),
            ctypes.c_uint64(int(y.data_ptr))]
    loaded.launch(P * -(-Q // aot.block_q), aot.num_warps * 32, stream, args)
