"""Fast scan kernels: Triton on CUDA (torch fast path, TensorRT plugin).

``enable_fast_scans()`` registers the Triton kernels of triton_scan.py as the torch
runtime's cummax and linear scan on CUDA when Triton is importable; eager models
then use them through models.ops.cummax and models.ops.linear_scan. Nothing here
is imported on machines without Triton.
"""

from __future__ import annotations


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def enable_fast_scans() -> bool:
    """Use the Triton scans for cummax and the linear scan on CUDA tensors; False when Triton or CUDA is missing."""
    import torch

    if not (torch.cuda.is_available() and triton_available()):
        return False
    from samout_edge.kernels.triton_scan import cummax, linear_scan
    from samout_edge.models.ops import FAST_KERNELS, FAST_LINEAR_KERNELS

    FAST_KERNELS["cuda"] = cummax
    FAST_LINEAR_KERNELS["cuda"] = linear_scan
    return True


enable_fast_cummax = enable_fast_scans  # the name the runners and benches call it by
# The scans.SCANS names with a Triton kernel (triton_scan.KERNELS), so with a TensorRT plugin; here, where
# importing it needs no Triton.
KERNEL_SCANS = ("max", "linear")
