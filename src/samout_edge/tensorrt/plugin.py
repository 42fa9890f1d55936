# ruff: noqa: UP006, UP035 - tensorrt.plugin validates typing.Tuple/List annotations, as in NVIDIA's samples
"""The CumMax TensorRT plugin: a quickly deployable plugin (`tensorrt.plugin`)
running the Triton scan of kernels/triton_cummax.py.

Which TensorRT runs what, for a `--lowering custom` export:
- 10.9 and newer: an ahead-of-time implementation. The Triton kernel is compiled
  to PTX at build time and baked into the engine: no Python at run time, and the
  engine also runs under `trtexec --loadEngine`.
- 10.6 to 10.8: a just-in-time implementation. TensorRT calls back into Python to
  launch the kernel, so the engine runs only where this module is imported (our
  TensorRT runner does that).
- 9.0 to 10.5 (JetPack 6.1/6.2's 10.3 among them): no quickly deployable plugins;
  the parser runs the CumMax node's local-function body, the native scan.
- before 9.0: no local functions either; use `--lowering native`.

The ONNX node is found by op type (CumMax) and its `plugin_namespace` attribute
(samout_edge), which the exporter writes on every CumMax node: 10.7+ then prefers
the registered plugin over the local function of the same name.
Verified only where TensorRT and a GPU exist (tests marked `tensorrt`).
"""

# No `from __future__ import annotations` here: tensorrt.plugin inspects the
# decorated functions' annotations as real types, and rejects strings.
import os
from typing import List, Tuple, Union

from samout_edge.lowering import DOMAIN, OP_TYPE

PLUGIN_ID = f"{DOMAIN}::{OP_TYPE}"
TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_registered: set[str] = set()


def _version(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def plugin_supported(tensorrt_version: str) -> bool:
    """Quickly deployable plugins exist from TensorRT 10.6; before that a custom
    export runs its CumMax function body (9.0+)."""
    return _version(tensorrt_version) >= (10, 6)


def register_cummax_plugin(tensorrt_version: str) -> None:
    """Register samout_edge::CumMax with TensorRT's plugin registry (once per process)."""
    from samout_edge.errors import SamoutError

    v = _version(tensorrt_version)
    if v < (10, 6):
        raise SamoutError(f"TensorRT {tensorrt_version} has no quickly deployable plugins (10.6+); "
                          "its parser runs the CumMax function body instead")
    if PLUGIN_ID in _registered:
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN_ID)
    def cummax_desc(x: trtp.TensorDesc, axis: int) -> trtp.TensorDesc:
        return x.like()

    # bf16 only ahead of time: the JIT path hands tensors to torch, whose
    # __cuda_array_interface__ import has no bf16.
    aot = v >= (10, 9)
    types = "FP32|FP16|BF16" if aot and hasattr(trt, "bfloat16") else "FP32|FP16"

    @trtp.autotune(PLUGIN_ID)
    def cummax_autotune(x: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(f"{types}, {types}", "LINEAR")]

    if aot:

        @trtp.aot_impl(PLUGIN_ID)
        def cummax_aot(
            x: trtp.TensorDesc, axis: int, outputs: Tuple[trtp.TensorDesc], tactic: int
        ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
            return compile_for_tensorrt(trt, trtp, x, axis)

    else:

        @trtp.impl(PLUGIN_ID)
        def cummax_jit(x: trtp.Tensor, axis: int, outputs: Tuple[trtp.Tensor], stream: int) -> None:
            import torch
            import triton

            from samout_edge.kernels.tiling import block_sizes, split_shape
            from samout_edge.kernels.triton_cummax import cummax_kernel

            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                src = torch.as_tensor(x, device="cuda")
                dst = torch.as_tensor(outputs[0], device="cuda")
                P, L, Q = split_shape(tuple(src.shape), axis)
                sms = torch.cuda.get_device_properties(src.device).multi_processor_count
                block_l, block_q = block_sizes(P, L, Q, 2 * sms)
                cummax_kernel[(P * triton.cdiv(Q, block_q),)](src, P, L, Q, dst, BLOCK_L=block_l, BLOCK_Q=block_q)

    _registered.add(PLUGIN_ID)


def compile_for_tensorrt(trt, trtp, x, axis: int):
    """Compile cummax_kernel to PTX for TensorRT: (kernel name, PTX, launch params, scalar args).

    Shapes are symbolic at build time: P, L and Q are products of the input's
    shape expressions, resolved by TensorRT at run time, so one engine serves
    every shape in its optimization profiles. Block sizes are fixed at build time
    (tuned for long sequences: 16 columns x 256 rows per tile).
    """
    import triton

    from samout_edge.kernels.tiling import MIN_BLOCK_Q, TILE_ELEMENTS
    from samout_edge.kernels.triton_cummax import cummax_kernel

    dims = x.shape_expr

    def product(exprs):  # symbolic product; 1 for no dims
        result = 1
        for e in exprs:
            result = e if isinstance(result, int) else result * e
        return result

    P = product(dims[i] for i in range(axis))
    L = dims[axis]
    Q = product(dims[i] for i in range(axis + 1, x.ndim))
    dtype = {trt.float32: "fp32", trt.float16: "fp16"}
    if hasattr(trt, "bfloat16"):
        dtype[trt.bfloat16] = "bf16"
    ptr = f"*{dtype[x.dtype]}"
    block_q = MIN_BLOCK_Q
    block_l = TILE_ELEMENTS // block_q
    source = triton.compiler.ASTSource(
        fn=cummax_kernel,
        signature={"x_ptr": ptr, "P": "i32", "L": "i32", "Q": "i32", "y_ptr": ptr},
        constexprs={"BLOCK_L": block_l, "BLOCK_Q": block_q},
    )
    # Newer Triton emits a PTX ISA older drivers reject; SAMOUT_EDGE_PTX_VERSION (e.g. 80)
    # pins it to what the device's driver accepts.
    ptx = os.environ.get("SAMOUT_EDGE_PTX_VERSION")
    compiled = triton.compile(source, options={"ptx_version": int(ptx)} if ptx else None)
    launch = trtp.KernelLaunchParams()
    q_blocks = -(-Q // block_q) if isinstance(Q, int) else trtp.cdiv(Q, block_q)  # Q is an int for the last axis
    if isinstance(P, int) and isinstance(q_blocks, int):
        launch.grid_x = P * q_blocks
    else:
        launch.grid_x = q_blocks if isinstance(P, int) else P * q_blocks
    launch.block_x = compiled.metadata.num_warps * 32
    launch.shared_mem = compiled.metadata.shared
    scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (P, L, Q)])
    return compiled.metadata.name.encode(), compiled.asm["ptx"].encode(), launch, scalars
