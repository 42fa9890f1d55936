"""cummax as one Triton kernel: bit-exact with torch.cummax, one read and one write.

The tensor is viewed as [P, L, Q] around the scan axis (contiguous). Each
program owns one p and BLOCK_Q columns and walks L in tiles of BLOCK_L rows:
a tile is loaded once, scanned in registers (tl.associative_scan with max),
combined with the running max carried from the previous tile, and stored.
Max is exact in any float type; values are widened to fp32 only so one kernel
serves fp32, fp16 and bf16, and narrowing back is exact. NaN propagates, as in
torch.cummax.

The same kernel is compiled ahead of time for the TensorRT plugin
(kernels/trt_plugin.py); its argument order (x, P, L, Q, y) is the one
TensorRT's quickly deployable plugins use (inputs, scalar args, outputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from samout_edge.kernels.tiling import block_sizes, split_shape


@triton.jit
def _max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def cummax_kernel(x_ptr, P, L, Q, y_ptr, BLOCK_L: tl.constexpr, BLOCK_Q: tl.constexpr):
    pid = tl.program_id(0)
    q_blocks = tl.cdiv(Q, BLOCK_Q)
    p = pid // q_blocks
    q = (pid % q_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < Q
    base = p.to(tl.int64) * L * Q
    carry = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    for start in range(0, L, BLOCK_L):
        rows = start + tl.arange(0, BLOCK_L)
        offsets = base + rows[:, None].to(tl.int64) * Q + q[None, :]
        mask = (rows[:, None] < L) & q_ok[None, :]
        tile = tl.load(x_ptr + offsets, mask=mask, other=float("-inf")).to(tl.float32)
        scanned = _max(tl.associative_scan(tile, 0, _max), carry[None, :])
        tl.store(y_ptr + offsets, scanned.to(y_ptr.dtype.element_ty), mask=mask)
        carry = tl.reduce(scanned, 0, _max)


def cummax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The values of torch.cummax(x, dim), computed by cummax_kernel."""
    dim = dim % x.dim()
    x = x.contiguous()
    y = torch.empty_like(x)
    P, L, Q = split_shape(tuple(x.shape), dim)
    if x.numel() == 0:
        return y
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    block_l, block_q = block_sizes(P, L, Q, 2 * sms)
    grid = (P * triton.cdiv(Q, block_q),)
    cummax_kernel[grid](x, P, L, Q, y, BLOCK_L=block_l, BLOCK_Q=block_q)
    return y
