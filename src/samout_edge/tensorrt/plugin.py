# ruff: noqa: UP006, UP035 - tensorrt.plugin validates typing.Tuple/List annotations, as in NVIDIA's samples
"""The scan plugins (CumMax, LinearScan): quickly deployable plugins (`tensorrt.plugin`)
running the Triton scans of kernels/triton_scan.py, one per scan that has a kernel
(kernels.KERNEL_SCANS), all registered by the same code over the scan registry.

What runs a `--lowering custom` export's scan nodes is versions.cummax_runner, the
same for every scan op (each carries a local-function body with the same CastLike):
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

How TensorRT launches an AOT kernel, and why our PTX declares exactly 5 (CumMax) or 6
(LinearScan: a, b) parameters:
TensorRT passes the input pointers, then the extra scalar arguments the aot_impl
returns (SymInt32 only; the plugin API has no 64-bit or pointer type), then the
output pointers (NVIDIA's samples/python/quickly_deployable_plugins circ_pad
kernel and torch-tensorrt's triton_op document the same order). So cummax_kernel
is declared (x, P, L, Q, y) and linear_scan_kernel (a, b, P, L, Q, h). Triton 3.3+ appends hidden pointer parameters to
every kernel (global_scratch, and from 3.5 profile_scratch): 7 in the PTX of
Triton 3.9. Recent TensorRT pads missing trailing arguments with null, but nothing
guarantees that for every 10.9+ release, and extra args cannot be appended after
the outputs; so compile_aot removes the hidden parameters from the .entry when the
kernel never reads them (its scratch sizes are 0) and checks that the PTX then
declares exactly the scan's SCAN_LAUNCH_ARGS. The PTX ISA is capped at what the device's driver
loads (JetPack 6's CUDA 12.6 driver takes PTX 8.5, JetPack 7's 13.0 takes 9.0;
Triton 3.9 emits 8.8 or 9.4), read from the driver at build time
(SAMOUT_EDGE_PTX_VERSION overrides it). Verified here by assembling that PTX with
ptxas for every shipped profile's GPU (tests/test_tensorrt_static.py); run on a
GPU only where TensorRT is (tests marked `tensorrt`).

The ONNX node is found by op type (CumMax, LinearScan) and its `plugin_namespace`
attribute (samout_edge), which the exporter writes on every scan node. tensorrt.plugin
reads each decorated function's parameters (TensorDesc inputs, then the `axis`
attribute), so `_decorate` spells one set per input count; their bodies are shared.
"""

# No `from __future__ import annotations` here: tensorrt.plugin inspects the
# decorated functions' annotations as real types, and rejects strings.
import ctypes
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

from samout_edge.artifact.graph import CUMMAX_DOMAIN, CUMMAX_PLUGIN_ID
from samout_edge.errors import SamoutError
from samout_edge.kernels import KERNEL_SCANS
from samout_edge.scans import SCANS
from samout_edge.tensorrt import versions

if TYPE_CHECKING:
    import tensorrt as trt

PLUGIN_ID = CUMMAX_PLUGIN_ID
# scans.SCANS name -> the plugin that runs its op: every scan with a Triton kernel.
PLUGIN_IDS: Dict[str, str] = {name: f"{CUMMAX_DOMAIN}::{SCANS[name].op_type}" for name in KERNEL_SCANS}
SCAN_OF_PLUGIN: Dict[str, str] = {pid: name for name, pid in PLUGIN_IDS.items()}
PTX_VERSION_ENV = "SAMOUT_EDGE_PTX_VERSION"  # e.g. 85: pin the PTX ISA by hand
_registered: Dict[str, str] = {}  # plugin id -> "aot" | "jit"
_kernels: Dict[Tuple[str, str, int, int], Any] = {}  # JIT: loaded PtxKernels by (scan, dtype, tile)


# The kernel's scalar parameters, passed as TensorRT "extra args" (SymInt32) between
# the input pointers and the output pointer, in this order.
EXTRA_ARGS = ("P", "L", "Q")


def launch_kinds(num_inputs: int = 1, num_outputs: int = 1) -> List[str]:
    """The argument kinds TensorRT passes an AOT plugin kernel, in order: input
    pointers, the SymInt32 extra args, output pointers (nothing after them)."""
    return ["ptr"] * num_inputs + ["i32"] * len(EXTRA_ARGS) + ["ptr"] * num_outputs


def plugin_kind(tensorrt_version: str) -> Optional[str]:
    """'aot' or 'jit' where our plugins run scan nodes (which carry a function body), else None."""
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
        raise SamoutError(f"the scan plugins take fp32, fp16 or bf16, not {dtype}")
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


def scan_of(plugin_id: str) -> str:
    """The scans.SCANS name a plugin id runs: 'samout_edge::LinearScan' -> 'linear'."""
    if plugin_id not in SCAN_OF_PLUGIN:
        raise SamoutError(f"no samout-edge plugin {plugin_id!r}; there are {', '.join(SCAN_OF_PLUGIN)}")
    return SCAN_OF_PLUGIN[plugin_id]


def register_plugins(plugin_ids: List[str], tensorrt_version: str) -> str:
    """Register each of ``plugin_ids`` (engine.json's plugins); returns 'aot' or 'jit'."""
    kinds = {register_scan_plugin(scan_of(pid), tensorrt_version) for pid in plugin_ids}
    return kinds.pop() if kinds else ""


def register_cummax_plugin(tensorrt_version: str) -> str:
    """samout_edge::CumMax alone (register_scan_plugin for max)."""
    return register_scan_plugin("max", tensorrt_version)


def register_scan_plugin(scan: str, tensorrt_version: str) -> str:
    """Register ``scan``'s plugin (samout_edge::CumMax, samout_edge::LinearScan) with TensorRT's
    plugin registry (once per process); returns 'aot' or 'jit'. Call it before the ONNX parser
    runs, and before an engine built with the JIT plugin is deserialized."""
    pid = PLUGIN_IDS.get(scan)
    if pid is None:
        raise SamoutError(f"no samout-edge plugin for the {scan!r} scan; plugins exist for {', '.join(PLUGIN_IDS)}")
    op = SCANS[scan].op_type
    kind = plugin_kind(tensorrt_version)
    if kind is None:
        runs = {"function": "their local-function body", "none": "nothing (export with --lowering native)"}
        raise SamoutError(f"TensorRT {tensorrt_version} does not use the {op} plugin: {op} nodes run "
                          f"{runs[versions.cummax_runner(tensorrt_version)]} there")
    if pid in _registered:
        return _registered[pid]
    versions.import_tensorrt()  # the real module, not the stubs' namespace package
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from samout_edge.tensorrt.driver import gpu_identity

    identity = gpu_identity()
    cap = ptx_version_cap(identity.driver_version)
    types = "FP32|FP16|BF16" if hasattr(trt, "bfloat16") else "FP32|FP16"
    arity = SCANS[scan].arity
    # every tensor (inputs, then the output) in one type: the alternatives pair up position by position
    combination = trtp.AutoTuneCombination(", ".join([types] * (arity + 1)), "LINEAR")

    def on_build(inputs: Tuple[Any, ...], axis: int) -> Tuple[bytes, bytes, Any, Any]:
        return aot_launch(trtp, inputs, axis, identity.compute_capability, cap, scan=scan)

    def on_run(inputs: Tuple[Any, ...], output: Any, axis: int, stream: int) -> None:
        jit_launch(inputs, output, axis, stream, identity.compute_capability, cap, scan=scan)

    _decorate(trtp, pid, arity, kind, combination, on_build, on_run)
    _registered[pid] = kind
    return kind


def _decorate(trtp: Any, pid: str, arity: int, kind: str, combination: Any, on_build: Any, on_run: Any) -> None:
    """The tensorrt.plugin registration of one scan op with ``arity`` inputs; the bodies are shared."""
    if arity == 1:

        @trtp.register(pid)
        def desc1(x: trtp.TensorDesc, axis: int) -> trtp.TensorDesc:
            return x.like()

        @trtp.autotune(pid)
        def tune1(x: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
            return [combination]

        if kind == "aot":

            @trtp.aot_impl(pid)
            def aot1(
                x: trtp.TensorDesc, axis: int, outputs: Tuple[trtp.TensorDesc], tactic: int
            ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
                return on_build((x,), axis)
        else:

            @trtp.impl(pid)
            def jit1(x: trtp.Tensor, axis: int, outputs: Tuple[trtp.Tensor], stream: int) -> None:
                on_run((x,), outputs[0], axis, stream)

    elif arity == 2:

        @trtp.register(pid)
        def desc2(a: trtp.TensorDesc, b: trtp.TensorDesc, axis: int) -> trtp.TensorDesc:
            return b.like()

        @trtp.autotune(pid)
        def tune2(a: trtp.TensorDesc, b: trtp.TensorDesc,
                  outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
            return [combination]

        if kind == "aot":

            @trtp.aot_impl(pid)
            def aot2(
                a: trtp.TensorDesc, b: trtp.TensorDesc, axis: int, outputs: Tuple[trtp.TensorDesc], tactic: int
            ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
                return on_build((a, b), axis)
        else:

            @trtp.impl(pid)
            def jit2(a: trtp.Tensor, b: trtp.Tensor, axis: int, outputs: Tuple[trtp.Tensor], stream: int) -> None:
                on_run((a, b), outputs[0], axis, stream)

    else:
        raise SamoutError(f"no plugin signature for a scan of {arity} tensors")


def aot_launch(trtp: Any, inputs: Tuple[Any, ...], axis: int, compute_capability: str, ptx_version: Optional[int],
               scan: str = "max") -> Tuple[bytes, bytes, Any, Any]:
    """(kernel name, PTX, launch params, extra args) for TensorRT's AOT path.

    Shapes are symbolic at build time: P, L and Q are products of the first input's
    shape expressions (the scan's inputs share a shape), resolved by TensorRT at run
    time, so one engine serves every shape in its optimization profiles.
    """
    from samout_edge.kernels.triton_scan import compile_aot

    dims = inputs[0].shape_expr
    rank = len(dims)
    axis = axis % rank
    kernel = compile_aot(_dtype_name(inputs[-1].dtype), axis, rank, compute_capability,
                         static_len=_static(dims[axis]), ptx_version=ptx_version, scan=scan)
    P = _product([dims[i] for i in range(axis)])
    L = dims[axis]
    Q = _product([dims[i] for i in range(axis + 1, rank)])
    q_blocks = -(-Q // kernel.block_q) if isinstance(Q, int) else trtp.cdiv(Q, kernel.block_q)
    launch = trtp.KernelLaunchParams()
    launch.grid_x = q_blocks if isinstance(P, int) and P == 1 else P * q_blocks
    launch.block_x = kernel.num_warps * 32
    launch.shared_mem = kernel.shared
    # Inputs, then these extra args in the kernel's order, then the output.
    scalars = {"P": P, "L": L, "Q": Q}
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(scalars[name]) for name in EXTRA_ARGS])
    return kernel.name.encode(), kernel.ptx.encode(), launch, extra


def jit_args(input_ptrs: List[int], output_ptr: int, P: int, L: int, Q: int) -> List[Any]:
    """The kernel's arguments in SCAN_LAUNCH_ARGS order, as the driver API takes them."""
    return ([ctypes.c_uint64(p) for p in input_ptrs] + [ctypes.c_int32(n) for n in (P, L, Q)]
            + [ctypes.c_uint64(output_ptr)])


def jit_launch(inputs: Tuple[Any, ...], y: Any, axis: int, stream: int, compute_capability: str,
               ptx_version: Optional[int], scan: str = "max") -> None:
    """Run the AOT kernel on concrete shapes through the driver API (the JIT path)."""
    from samout_edge.kernels.tiling import aot_block_sizes, split_shape
    from samout_edge.kernels.triton_scan import compile_aot
    from samout_edge.tensorrt.driver import PtxKernel

    shape = tuple(int(d) for d in inputs[0].shape)
    axis = axis % len(shape)
    dtype = _dtype_name(inputs[-1].dtype)
    P, L, Q = split_shape(shape, axis)
    if P * L * Q == 0:
        return
    static_len = L if L <= 64 else None  # a short axis (the heads) gets the tight tile, as in the AOT path
    key = (scan, dtype, *aot_block_sizes(static_len))
    if key not in _kernels:
        aot = compile_aot(dtype, axis, len(shape), compute_capability, static_len=static_len,
                          ptx_version=ptx_version, scan=scan)
        _kernels[key] = (aot, PtxKernel(aot.ptx, aot.name, aot.shared))
    aot, loaded = _kernels[key]
    args = jit_args([int(t.data_ptr) for t in inputs], int(y.data_ptr), P, L, Q)
    loaded.launch(P * -(-Q // aot.block_q), aot.num_warps * 32, stream, args)
