"""The weight-only quantization grid, and applying it to a model.

Below the runtime so that every PyTorch reference (the export's golden model,
``verify --lengths``, the torch runner of a quantized export) computes with the
same dequantized weights the graph holds. The scheme and the graph forms are
described in exporter/quantize.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


def quantize_model(model: nn.Module, bits: int, block: int | None,
                   embedding_bits: int | None = None) -> dict[str, QuantizedWeight]:
    """Quantize every Linear and Embedding weight on the grid, in the model's own
    dtype, and replace it in place by its dequantized value; returns the grid by
    parameter name (apply it to other copies of the model with ``apply_weights``).
    ``embedding_bits`` 8: the embedding table on the int8 grid (one scale per row)."""
    import torch
    from torch import nn

    table = {}
    with torch.no_grad():
        for name, module in quantized_modules(model):
            w = module.weight.detach().cpu().numpy()
            if isinstance(module, nn.Embedding) and embedding_bits == 8 and bits != 8:
                table[name] = quantize(w, 8, None)
            else:
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


# --------------------------------------------------------------------------- int8 activations

# ONNX Runtime's MatMulNBits blocks: a power of two from 16 to 256 (ONNX Runtime 1.23 computes
# blocks of 512 wrong); one scale per row repeats over several such blocks, the same function.
NBITS_BLOCKS = (256, 128, 64, 32, 16)  # largest first


def nbits_block(qw: QuantizedWeight) -> int | None:
    """The MatMulNBits block size for ``qw`` (its weights' and, at int8 activations, its
    input's quantization block), or None where there is none."""
    if not qw.per_row:
        return qw.block if qw.block in NBITS_BLOCKS else None
    return next((b for b in NBITS_BLOCKS if qw.q.shape[1] % b == 0), None)


_ROUNDING = ["x86"]  # the kernel quantize_activations follows: x86 (the golden outputs) or arm


@contextmanager
def activation_rounding(kernel: str) -> Iterator[None]:
    """Emulate another CPU's kernel within the block: ``arm`` (NEON: ``x * (1 / s)``, ties
    half away from zero) instead of ``x86`` (AVX2/AVX-512: ``x * (127 / max|x|)``, ties to even)."""
    _ROUNDING.append(kernel)
    try:
        yield
    finally:
        _ROUNDING.pop()


def quantize_activations(x, block: int):
    """What ONNX Runtime's MatMulNBits at accuracy level 4 does to its input (MLAS
    QuantizeARow_CompInt8): per block of ``block`` inputs, ``s = max|x| / 127`` and, on x86,
    ``q = round_half_even(x * (127 / max|x|))``; returns ``q * s`` in x's dtype. The true
    division matters: torch's ``127 / t`` is ``reciprocal(t) * 127``, an ulp off, and
    dequantized weights put many inputs exactly on .5."""
    import torch

    shape, dtype = x.shape, x.dtype
    blocks = x.float().reshape(*shape[:-1], shape[-1] // block, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    scale = amax / 127.0
    if _ROUNDING[-1] == "arm":
        inverse = torch.where(amax > 0, torch.ones_like(scale) / scale, torch.zeros_like(amax))
        v = blocks * inverse
        q = torch.sign(v) * torch.floor(v.abs() + 0.5)
    else:
        inverse = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
        q = torch.round(blocks * inverse)
    return (q * scale).reshape(shape).to(dtype)


def set_int8_activations(model: nn.Module, table: dict[str, QuantizedWeight]) -> None:
    """Make every quantized Linear of ``model`` quantize its input as MatMulNBits at accuracy
    level 4 does: the PyTorch reference of an export computing with int8 activations
    (``export --activations int8``). A Linear the model calls as a module (``combined``,
    ``head``: their calls stay modules so fp16 calibration sees them) gets a forward
    pre-hook; one it calls through models/model.py ``linear`` (the FFN's) reads
    ``int8_block`` there. Each input is quantized once either way."""
    from torch import nn

    for name, module in quantized_modules(model):
        if isinstance(module, nn.Linear):
            module.int8_block = block = nbits_block(table[name])
            module.register_forward_pre_hook(lambda mod, args, b=block: (quantize_activations(args[0], b), *args[1:]))


def grid_of(weights: Weights | None) -> tuple[int, int | None, int | None] | None:
    """(bits, block, embedding bits) of an export's quantized weights; None for float weights."""
    if weights is None or not weights.quantized:
        return None
    return weights.bits, weights.block_size, weights.embedding_bits


def quantize_like_export(model: nn.Module, source: nn.Module, weights: Weights | None) -> None:
    """Give ``model`` the dequantized weights an export holds (and its int8 activations,
    where it computes with them). ``source`` is the checkpoint's model in the export's
    dtype (the grid is computed in that dtype, as the export did); ``model`` may have any
    dtype. No-op for float weights."""
    grid = grid_of(weights)
    if grid is not None:
        table = quantize_model(source, *grid)
        apply_weights(model, table)
        if weights.activations == "int8":
            set_int8_activations(model, table)
