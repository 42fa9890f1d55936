"""The cumulative maximum SamOut mixes tokens with, and the hook the exporter needs.

``torch.cummax`` has no ONNX translation, so while ``torch.export`` traces the model
each cummax becomes one ``samout_edge::cummax`` custom op; the exporter turns that
node into standard ONNX ops or a ``CumMax`` custom node (lowering.py).
In eager mode the call goes straight to ``torch.cummax`` (or a faster kernel where
one is registered for the device), so the custom op costs nothing at run time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# device type -> kernel(x, dim) returning the running max values; filled by kernels.enable_fast_cummax.
FAST_KERNELS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {}


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
