"""The weight-only quantization grids, in numpy: symmetric (zero-point 0, a scale per row
or per block, searched for the least squared error) and asymmetric (a zero-point per
block); dequantizing; MatMulNBits' block for a weight; and ``read_grid``, the grid an
export's graph holds. Below the runtime so that every PyTorch reference computes with
the same dequantized weights the graph holds. The scheme and the graph forms are
described in exporter/quantize.py; GPTQ (gptq.py) rounds onto the same grids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from samout_edge.artifact.quantization import NBITS_BLOCKS
from samout_edge.errors import SamoutError


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight in torch's layout ``[rows, cols]`` on its grid."""

    q: np.ndarray  # int8 container, integers in [-qmax - 1, qmax] (the full two's-complement range), [rows, cols]
    scale: np.ndarray  # [rows, blocks], the weight's float dtype, every one > 0
    bits: int
    block: int  # cols per scale (cols itself: one scale per row)
    zero: np.ndarray | None = None  # asymmetric blocks: [rows, blocks] int8, q and zero in [0, 2^bits - 1]

    @property
    def asymmetric(self) -> bool:
        return self.zero is not None

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


def check_weight(w: np.ndarray, what: str) -> None:
    if w.ndim != 2 or w.dtype not in (np.float32, np.float16):
        raise ValueError(f"{what} takes a 2-D float32/float16 array, got {w.dtype} {w.shape}")
    if not np.isfinite(w).all():
        raise SamoutError("the checkpoint has non-finite weights (inf or NaN); they cannot be quantized")


def quantize(w: np.ndarray, bits: int, block: int | None = None) -> QuantizedWeight:
    """Round-to-nearest on a symmetric grid (zero-point 0) over the full range
    ``[-qmax - 1, qmax]`` (int4: 16 levels, not 15): one scale per row (``block``
    None) or per ``block`` consecutive columns, each the one of ``max|w| / d``,
    d from qmax to qmax + 1 in SEARCH_STEPS steps, whose rounding error (squared,
    over the block) is least. d = qmax is the classic ``max|w| / qmax`` grid, so the
    search is never worse than it; larger d uses the extra negative level. The
    scale has ``w``'s dtype; an all-zero block gets scale 1 (TensorRT needs every
    scale positive)."""
    check_weight(w, "quantize")
    rows, cols = w.shape
    block = cols if block is None else block
    blocks = -(-cols // block)
    top = qmax(bits)
    wide = np.zeros((rows, blocks * block), np.float32)
    wide[:, :cols] = w
    grouped = wide.reshape(rows, blocks, block)
    scale = best_scales(grouped, top, w.dtype)
    q = np.clip(np.rint(grouped / scale.astype(np.float32)[:, :, None]), -top - 1, top).astype(np.int8)
    return QuantizedWeight(q.reshape(rows, -1)[:, :cols].copy(), scale, bits, block)


def best_scales(grouped: np.ndarray, top: int, dtype) -> np.ndarray:
    """``[rows, blocks]`` scales in ``dtype`` for fp32 ``grouped`` ``[rows, blocks, block]``:
    per block the ``max|w| / d``, d from ``top`` to ``top + 1``, with the least squared
    rounding error on the grid ``[-top - 1, top]`` (see ``quantize``)."""
    amax = np.abs(grouped).max(axis=2)
    best_scale, best_err = None, None
    for d in np.linspace(top, top + 1, SEARCH_STEPS, dtype=np.float32):
        scale = (amax / d).astype(dtype)
        scale[~(scale > 0)] = 1
        s32 = scale.astype(np.float32)[:, :, None]
        err = np.square(np.clip(np.rint(grouped / s32), -top - 1, top) * s32 - grouped).sum(axis=2)
        if best_scale is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale, best_err = np.where(better, scale, best_scale), np.where(better, err, best_err)
    return best_scale



def expand_scale(qw: QuantizedWeight) -> np.ndarray:
    """The scale of every element, ``[rows, cols]``."""
    return np.repeat(qw.scale, qw.block, axis=1)[:, : qw.q.shape[1]]


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """``(q - zero) * s`` in the scale's dtype: what DequantizeLinear computes."""
    if qw.zero is None:
        return qw.q.astype(qw.scale.dtype) * expand_scale(qw)
    zero = np.repeat(qw.zero, qw.block, axis=1)[:, : qw.q.shape[1]]
    return (qw.q.astype(np.int16) - zero).astype(qw.scale.dtype) * expand_scale(qw)


ASYMMETRIC_SHRINK = np.linspace(1.0, 0.8, 9, dtype=np.float32)  # the range tried: [min, max] x f, f from 1 down


def quantize_asymmetric(w: np.ndarray, bits: int, block: int) -> QuantizedWeight:
    """Round-to-nearest on an asymmetric grid: per block ``q = clip(rint(w / s) + z, 0,
    2^bits - 1)`` over the block's range ``[min(w, 0), max(w, 0)]`` shrunk by the f in
    ASYMMETRIC_SHRINK whose squared rounding error is least (f = 1 is the plain min-max
    grid). A zero-point per block places the 16 int4 levels where the block's values
    are, where the symmetric grid spends half its levels on a side a skewed block
    barely uses. ONNX Runtime only (TensorRT takes zero zero-points only)."""
    check_weight(w, "quantize_asymmetric")
    rows, cols = w.shape
    if cols % block:
        raise ValueError(f"asymmetric blocks must be whole: {block} does not divide {cols}")
    grouped = w.astype(np.float32).reshape(rows, cols // block, block)
    scale, zero = best_asymmetric(grouped, bits, w.dtype)
    q = round_asymmetric(grouped, scale[:, :, None], zero[:, :, None], bits)
    return QuantizedWeight(q.reshape(rows, cols), scale, bits, block, zero)


def best_asymmetric(grouped: np.ndarray, bits: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """``([rows, blocks] scales in dtype, [rows, blocks] int8 zero-points)`` for fp32 ``grouped``."""
    top = 2 ** bits - 1
    lo, hi = np.minimum(grouped.min(axis=2), 0), np.maximum(grouped.max(axis=2), 0)
    best = None
    for f in ASYMMETRIC_SHRINK:
        scale = ((hi - lo) * f / top).astype(dtype)
        scale[~(scale > 0)] = 1
        s32 = scale.astype(np.float32)
        zero = np.clip(np.rint(-lo * f / s32), 0, top).astype(np.int8)
        q = round_asymmetric(grouped, s32[:, :, None], zero[:, :, None], bits)
        err = np.square((q.astype(np.float32) - zero[:, :, None]) * s32[:, :, None] - grouped).sum(axis=2)
        if best is None:
            best = scale, zero, err
        else:
            better = err < best[2]
            best = np.where(better, scale, best[0]), np.where(better, zero, best[1]), np.where(better, err, best[2])
    return best[0], best[1]


def round_asymmetric(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    return np.clip(np.rint(w / scale.astype(np.float32)) + zero, 0, 2 ** bits - 1).astype(np.int8)



def nbits_block(qw: QuantizedWeight) -> int | None:
    """The MatMulNBits block size for ``qw`` (its weights' and, at int8 activations, its
    input's quantization block), or None where there is none: NBITS_BLOCKS, largest first;
    one scale per row repeats over several such blocks, the same function."""
    if not qw.per_row:
        return qw.block if qw.block in NBITS_BLOCKS else None
    return next((b for b in NBITS_BLOCKS if qw.q.shape[1] % b == 0), None)


# --------------------------------------------------------------------------- the grid in a graph


def read_grid(model, params: dict[str, tuple[int, int]], bits: dict[str, int]) -> dict[
        str, QuantizedWeight]:
    """The grid each quantized parameter has in the graph (``params``: name -> torch-layout
    shape; ``bits``: name -> its bits), read from what exporter/quantize.py
    ``quantize_graph`` wrote (writer and reader change together): the artifact, not a
    recomputation, is what a PyTorch reference of the export computes
    with (a GPTQ grid cannot be recomputed without its calibration text). A parameter
    the graph does not hold as written here is an error."""
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes = {x: node for node in model.graph.node for x in node.input[:1]}  # a weight's first consumer
    table = {}
    for param, (rows, cols) in params.items():
        b = bits[param]
        base = next((f"{param}{s}" for s in ("", ".0") if f"{param}{s}.q" in inits or f"{param}{s}.nbits" in inits),
                    None)
        if base is None:
            raise SamoutError(f"the graph holds no quantized form of {param!r}: it is not an export of this tool's, "
                              "or it was edited")
        zero = None
        if f"{base}.nbits" in inits:  # MatMulNBits: [rows, blocks, bytes] uint8, offset 2^(bits-1); never transposed
            q = numpy_helper.to_array(inits[f"{base}.nbits"]).reshape(rows, -1)
            q = (unpack_nibbles(q) if b == 4 else q)[:, :cols].astype(np.int16)
            scale = numpy_helper.to_array(inits[f"{base}.scales"]).reshape(rows, -1)
            if f"{base}.zero_points" in inits:  # asymmetric: the values as they are, a zero-point per block
                zero = unpack_nibbles(numpy_helper.to_array(inits[f"{base}.zero_points"]).reshape(rows, -1))
                zero = zero[:, :scale.shape[1]].astype(np.int8)
            else:
                q -= 1 << (b - 1)
            q = q.astype(np.int8)
        else:
            q = numpy_helper.to_array(inits[f"{base}.q"])
            scale = numpy_helper.to_array(inits[f"{base}.scale"])
            node = nodes.get(f"{base}.q")
            if node is not None and node.op_type == "DequantizeLinear":
                point = inits[f"{base}.zero_point"]
                if point.data_type == TensorProto.UINT4:
                    zero = numpy_helper.to_array(point).astype(np.int8)
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                if axis == (1 if b == 8 else 0):  # transposed: a MatMul's B
                    q, scale = q.T, (scale if scale.ndim == 1 else scale.T)
                    zero = None if zero is None else zero.T
                q = q.astype(np.int8)
            elif q.dtype == np.uint8:  # GatherBlockQuantized's int8 table: uint8 with zero-point 128
                q = (q.astype(np.int16) - 128).astype(np.int8)
            else:  # GatherBlockQuantized's int4 table
                q = q.astype(np.int8)
            scale = scale.reshape(rows, -1)
        if q.shape != (rows, cols):
            raise SamoutError(f"the graph's {param!r} has shape {list(q.shape)}, the model's is {[rows, cols]}")
        if b == 8:  # one scale per row (spread over MatMulNBits' blocks there)
            scale = scale[:, :1]
        table[param] = QuantizedWeight(np.ascontiguousarray(q), np.ascontiguousarray(scale), b, cols // scale.shape[1],
                                       None if zero is None else np.ascontiguousarray(zero))
    return table


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """``[rows, n]`` bytes -> ``[rows, 2n]`` values, low nibble first (``_pack_nibbles`` undone)."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
