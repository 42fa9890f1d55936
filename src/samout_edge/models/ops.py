"""The scans the mixers run over the sequence (scans.py), and the hooks the exporter needs.

The cumulative maximum SamOut mixes tokens with, and the linear recurrence of
``--arch linear``.

``torch.cummax`` has no ONNX translation, so while ``torch.export`` traces the model
each cummax becomes one ``samout_edge::cummax`` custom op; the exporter turns that
node into standard ONNX ops or a ``CumMax`` custom node (lowering.py).
The linear recurrence becomes one ``samout_edge::linear_scan`` op the same way
(a ``LinearScan`` node). In eager mode the call goes straight to ``torch.cummax``
and to the blocked linear scan, or to a faster kernel where one is registered for
the device (FAST_KERNELS, FAST_LINEAR_KERNELS: the Triton scans on CUDA), so the
custom ops cost nothing at run time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# device type -> kernel(x, dim) returning the running max values; filled by kernels.enable_fast_scans.
FAST_KERNELS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {}
# device type -> kernel(a, b, dim) returning h of h_t = a_t h_{t-1} + b_t from h_{-1} = 0 (the LinearScan op);
# filled by kernels.enable_fast_scans. Used for inference only: the kernels have no backward.
FAST_LINEAR_KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {}


@torch.library.custom_op("samout_edge::cummax", mutates_args=())
def cummax_op(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.cummax(x, dim).values


@cummax_op.register_fake
def _cummax_fake(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.empty_like(x)


def cummax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Running maximum of ``x`` along ``dim`` (the values of ``torch.cummax``)."""
    if torch.compiler.is_exporting():
        return cummax_op(x, dim)
    kernel = FAST_KERNELS.get(x.device.type)
    if kernel is not None:
        return kernel(x, dim)
    return torch.cummax(x, dim).values


BLOCK = 16  # tokens per block of the eager linear scan


@torch.library.custom_op("samout_edge::linear_scan", mutates_args=())
def linear_scan_op(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    if dim != 2:
        raise ValueError(f"the linear scan runs along dim 2 (the sequence), not {dim}")
    return blocked_linear_scan(a, b, torch.zeros_like(b[:, :, :1]))


@linear_scan_op.register_fake
def _linear_scan_fake(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.empty_like(b)


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """``h_t = a_t * h_{t-1} + b_t`` along dim 2 of ``[batch, heads, seq, head_dim]``, from
    ``h_{-1} = h0`` (``[batch, heads, 1, head_dim]``); every h_t. While exporting, h0 is folded
    into the first step (``b_0 + a_0 * h0``) and the rest is one ``samout_edge::linear_scan``
    node, which becomes a ``LinearScan`` placeholder (scans.py, lowering.py)."""
    if torch.compiler.is_exporting():
        first = a[:, :, :1] * h0 + b[:, :, :1]
        return linear_scan_op(a, torch.cat([first, b[:, :, 1:]], 2), 2)
    kernel = FAST_LINEAR_KERNELS.get(b.device.type)
    if kernel is not None and not (torch.is_grad_enabled() and any(t.requires_grad for t in (a, b, h0))):
        return fast_linear_scan(kernel, a, b, h0)
    return blocked_linear_scan(a, b, h0)


def fast_linear_scan(kernel: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], a: torch.Tensor,
                     b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """A registered kernel's scan from h_{-1} = h0: h0 folded into the first step (in at least fp32, as the
    blocked scan computes), the kernel from zero, in the inputs' dtype."""
    work = torch.promote_types(b.dtype, torch.float32)
    first = (a[:, :, :1].to(work) * h0.to(work) + b[:, :, :1].to(work)).to(b.dtype)
    return kernel(a, torch.cat([first, b[:, :, 1:]], 2), 2)


def blocked_linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """The recurrence in at least fp32, as lowering.py's blocked scan computes it: within blocks of
    ``block`` tokens a sequential scan of the pairs ``(A, B)`` (A the decay so far, B h from zero),
    all blocks at once; then each block's start, ``h`` after the blocks before it, by a doubling
    scan over the block totals; then ``h = A * start + B``. O(seq) work, products of decays in
    (0, 1) and convex sums only: nothing overflows, no exp or log. Autograd runs through it."""
    dtype, (batch, heads, seq, dim) = a.dtype, a.shape
    work = torch.promote_types(dtype, torch.float32)
    a, b, h0 = a.to(work), b.to(work), h0.to(work)
    if seq == 1:  # a decode step
        return (a * h0 + b).to(dtype)
    pad = -seq % block  # identity elements (a = 1, b = 0) past the end
    a = F.pad(a, (0, 0, 0, pad), value=1.0).view(batch, heads, -1, block, dim)
    b = F.pad(b, (0, 0, 0, pad)).view(batch, heads, -1, block, dim)
    decay, h = [a[:, :, :, 0]], [b[:, :, :, 0]]
    for i in range(1, block):
        decay.append(decay[-1] * a[:, :, :, i])
        h.append(a[:, :, :, i] * h[-1] + b[:, :, :, i])
    decay, h = torch.stack(decay, 3), torch.stack(h, 3)  # [batch, heads, blocks, block, dim]
    total_a, total_h = decay[:, :, :, -1], h[:, :, :, -1]  # each block alone: h_end = total_a * h_start + total_h
    step = 1
    while step < total_a.shape[2]:  # inclusive scan over the blocks: (a, h) then (a', h') = (a a', a' h + h')
        earlier_a = F.pad(total_a, (0, 0, step, 0), value=1.0)[:, :, : total_a.shape[2]]
        earlier_h = F.pad(total_h, (0, 0, step, 0))[:, :, : total_h.shape[2]]
        total_a, total_h = earlier_a * total_a, total_a * earlier_h + total_h
        step *= 2
    end = total_a * h0 + total_h  # h at the end of every block
    start = torch.cat([h0, end[:, :, :-1]], 2).unsqueeze(3)  # ... and at the start of every block
    out = (decay * start + h).reshape(batch, heads, -1, dim)[:, :, :seq]
    return out.to(dtype)
