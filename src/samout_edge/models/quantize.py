"""The weight-only quantization grid, and applying it to a model.

Below the runtime so that every PyTorch reference (the export's golden model,
``verify --lengths``, the torch runner of a quantized export) computes with the
same dequantized weights the graph holds. The scheme and the graph forms are
described in exporter/quantize.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from samout_edge.artifact.quantization import Weights
from samout_edge.errors import SamoutError

if TYPE_CHECKING:
    from torch import nn



@dataclass(frozen=True)
class QuantizedWeight:
    """A weight in torch's layout ``[rows, cols]`` on its grid."""

    q: np.ndarray  # int8 container, integers in [-qmax - 1, qmax] (the full two's-complement range), [rows, cols]
    scale: np.ndarray  # [rows, blocks], the weight's float dtype, every one > 0
    bits: int
    block: int  # cols per scale (cols itself: one scale per row)

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape  # type: ignore[return-value]

    @property
    def blocks(self) -> int:
        return self.scale.shape[1]

    @property
    def per_row(self) -> bool:
        return self.blocks == 1 and self.block >= self.q.shape[1]


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


SEARCH_STEPS = 9  # candidate scales per block: max|w| / d for d from qmax to qmax + 1


def quantize(w: np.ndarray, bits: int, block: int | None = None) -> QuantizedWeight:
    """Round-to-nearest on a symmetric grid (zero-point 0) over the full range
    ``[-qmax - 1, qmax]`` (int4: 16 levels, not 15): one scale per row (``block``
    None) or per ``block`` consecutive columns, each the one of ``max|w| / d``,
    d from qmax to qmax + 1 in SEARCH_STEPS steps, whose rounding error (squared,
    over the block) is least. d = qmax is the classic ``max|w| / qmax`` grid, so the
    search is never worse than it; larger d uses the extra negative level. The
    scale has ``w``'s dtype; an all-zero block gets scale 1 (TensorRT needs every
    scale positive)."""
    if w.ndim != 2 or w.dtype not in (np.float32, np.float16):
        raise ValueError(f"quantize takes a 2-D float32/float16 array, got {w.dtype} {w.shape}")
    if not np.isfinite(w).all():
        raise SamoutError("the checkpoint has non-finite weights (inf or NaN); they cannot be quantized")
    rows, cols = w.shape
    block = cols if block is None else block
    blocks = -(-cols // block)
    top = qmax(bits)
    wide = np.zeros((rows, blocks * block), np.float32)
    wide[:, :cols] = w
    grouped = wide.reshape(rows, blocks, block)
    amax = np.abs(grouped).max(axis=2)
    best_scale, best_err = None, None
    for d in np.linspace(top, top + 1, SEARCH_STEPS, dtype=np.float32):
        scale = (amax / d).astype(w.dtype)
        scale[~(scale > 0)] = 1
        s32 = scale.astype(np.float32)[:, :, None]
        err = np.square(np.clip(np.rint(grouped / s32), -top - 1, top) * s32 - grouped).sum(axis=2)
        if best_scale is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale, best_err = np.where(better, scale, best_scale), np.where(better, err, best_err)
    q = np.clip(np.rint(grouped / best_scale.astype(np.float32)[:, :, None]), -top - 1, top).astype(np.int8)
    return QuantizedWeight(q.reshape(rows, -1)[:, :cols].copy(), best_scale, bits, block)


def expand_scale(qw: QuantizedWeight) -> np.ndarray:
    """The scale of every element, ``[rows, cols]``."""
    return np.repeat(qw.scale, qw.block, axis=1)[:, : qw.q.shape[1]]


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """``q * s`` in the scale's dtype: what DequantizeLinear computes."""
    return qw.q.astype(qw.scale.dtype) * expand_scale(qw)


# --------------------------------------------------------------------------- the model


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Linear and Embedding of the model, by parameter name of its weight."""
    from torch import nn

    return [(f"{name}.weight", m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]


def quantize_model(model: nn.Module, bits: int, block: int | None) -> dict[str, QuantizedWeight]:
    """Quantize every Linear and Embedding weight on the grid, in the model's own
    dtype, and replace it in place by its dequantized value; returns the grid by
    parameter name (apply it to other copies of the model with ``apply_weights``)."""
    import torch

    table = {}
    with torch.no_grad():
        for name, module in quantized_modules(model):
            w = module.weight.detach().cpu().numpy()
            table[name] = quantize(w, bits, block)
    apply_weights(model, table)
    return table


def apply_weights(model: nn.Module, table: dict[str, QuantizedWeight]) -> None:
    """Set each quantized weight of ``model`` (any dtype) to ``dequantize`` of its grid."""
    import torch

    modules = dict(quantized_modules(model))
    if set(modules) != set(table):
        raise SamoutError("the model's Linear/Embedding weights do not match the quantized ones (internal error)")
    with torch.no_grad():
        for name, qw in table.items():
            weight = modules[name].weight
            weight.copy_(torch.from_numpy(dequantize(qw)).to(weight.dtype))


def grid_of(weights: Weights | None) -> tuple[int, int | None] | None:
    """(bits, block) of an export's quantized weights; None for float weights."""
    if weights is None or not weights.quantized:
        return None
    return weights.bits, weights.block_size


def quantize_like_export(model: nn.Module, source: nn.Module, weights: Weights | None) -> None:
    """Give ``model`` the dequantized weights an export holds. ``source`` is the
    checkpoint's model in the export's dtype (the grid is computed in that dtype,
    as the export did); ``model`` may have any dtype. No-op for float weights."""
    grid = grid_of(weights)
    if grid is not None:
        apply_weights(model, quantize_model(source, *grid))
