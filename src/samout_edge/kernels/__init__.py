"""Fast cummax kernels: Triton on CUDA (torch fast path, TensorRT plugin).

``enable_fast_cummax()`` registers the Triton kernel as the torch runtime's
cummax on CUDA when Triton is importable; eager models then use it through
models.ops.cummax. Nothing here is imported on machines without Triton.
"""

from __future__ import annotations


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def enable_fast_cummax() -> bool:
    """Use the Triton scan for cummax on CUDA tensors; False when Triton or CUDA is missing."""
    import torch

    if not (torch.cuda.is_available() and triton_available()):
        return False
    from samout_edge.kernels.triton_cummax import cummax as triton_cummax
    from samout_edge.models.ops import FAST_KERNELS

    FAST_KERNELS["cuda"] = triton_cummax
    return True
