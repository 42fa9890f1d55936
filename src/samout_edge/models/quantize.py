"""The weight-only quantization grid, and applying it to a model.

Below the runtime so that every PyTorch reference (the export's golden model,
``verify --lengths``, the torch runner of a quantized export) computes with the
same dequantized weights the graph holds. The scheme and the graph forms are
described in exporter/quantize.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from samout_edge.artifact.quantization import CALIBRATION_TOKENS, CALIBRATION_WINDOW, Weights
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


def _check_weight(w: np.ndarray, what: str) -> None:
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
    _check_weight(w, "quantize")
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


GPTQ_DAMP = 0.01  # of the Gram matrix's mean diagonal, added to it: GPTQ's usual damping
GPTQ_BATCH = 128  # columns per lazy update where one scale spans the row (int8)


def gptq(w: np.ndarray, gram: np.ndarray, bits: int, block: int | None = None,
         asymmetric: bool = False) -> QuantizedWeight:
    """The same grid as ``quantize`` (or ``quantize_asymmetric``: the same scale search,
    the same graph forms), but each column is rounded knowing the inputs it will meet
    (GPTQ: Frantar et al., 2022): the rounding error of column i, weighted by the inverse
    of the inputs' Gram matrix ``gram = E[x x^T]``, is pushed onto the columns not yet
    rounded, so the layer's output on such inputs moves least. A block's scale (and
    zero-point) is searched on its columns as updated when the block's turn comes; one
    scale per row (``block`` None) is chosen from the row as given. On the trained SamOut
    at int4 (64 KiB held-out text) it cuts the mean KL from fp32 from 0.0080 to 0.0024
    at the same size."""
    _check_weight(w, "gptq")
    rows, cols = w.shape
    if gram.shape != (cols, cols):
        raise ValueError(f"gram {gram.shape} does not fit a weight with {cols} inputs")
    per_row = block is None
    if asymmetric and per_row:
        raise ValueError("asymmetric grids have blocks")
    block = cols if per_row else block
    if cols % block:
        raise ValueError(f"gptq takes whole blocks: {block} does not divide {cols}")
    h = np.array(gram, np.float64)
    dead = np.diag(h) <= 0  # an input the calibration never moved: plain rounding (no error to spread)
    h[dead, dead] = 1.0
    upper = _inverse_cholesky(h).astype(np.float32)
    work = w.astype(np.float32)
    top, blocks = qmax(bits), cols // block
    scale = best_scales(work.reshape(rows, 1, cols), top, w.dtype) if per_row else np.empty((rows, blocks), w.dtype)
    zero = np.zeros((rows, blocks), np.int8) if asymmetric else None
    q = np.empty((rows, cols), np.int8)
    batch = GPTQ_BATCH if per_row else block
    for start in range(0, cols, batch):
        end = min(start + batch, cols)
        part = work[:, start:end].copy()
        b = 0 if per_row else start // block
        if asymmetric:
            found = best_asymmetric(part.reshape(rows, 1, -1), bits, w.dtype)
            scale[:, b], zero[:, b] = found[0][:, 0], found[1][:, 0]
        elif not per_row:
            scale[:, b] = best_scales(part.reshape(rows, 1, -1), top, w.dtype)[:, 0]
        s32 = scale[:, b].astype(np.float32)
        errors = np.empty_like(part)
        for j in range(end - start):
            i = start + j
            if asymmetric:
                q[:, i] = _round_asymmetric(part[:, j], s32, zero[:, b], bits)
                rounded = (q[:, i] - zero[:, b].astype(np.float32)) * s32
            else:
                q[:, i] = np.clip(np.rint(part[:, j] / s32), -top - 1, top)
                rounded = q[:, i] * s32
            errors[:, j] = (part[:, j] - rounded) / upper[i, i]
            part[:, j + 1:] -= np.outer(errors[:, j], upper[i, i + 1:end])
        work[:, end:] -= errors @ upper[start:end, end:]
    return QuantizedWeight(q, scale, bits, cols if per_row else block, zero)


def _inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor of ``(h + damp)^-1``; more damping where ``h`` is too close
    to singular (inputs that always move together)."""
    damp = GPTQ_DAMP * float(np.diag(h).mean())
    for _ in range(4):
        try:
            return np.linalg.cholesky(np.linalg.inv(h + damp * np.eye(len(h)))).T
        except np.linalg.LinAlgError:
            damp *= 10
    raise SamoutError("GPTQ: the calibration inputs' Gram matrix is singular even damped; give a longer, more "
                      "varied --calibration-text")


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
    _check_weight(w, "quantize_asymmetric")
    rows, cols = w.shape
    if cols % block:
        raise ValueError(f"asymmetric blocks must be whole: {block} does not divide {cols}")
    grouped = w.astype(np.float32).reshape(rows, cols // block, block)
    scale, zero = best_asymmetric(grouped, bits, w.dtype)
    q = _round_asymmetric(grouped, scale[:, :, None], zero[:, :, None], bits)
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
        q = _round_asymmetric(grouped, s32[:, :, None], zero[:, :, None], bits)
        err = np.square((q.astype(np.float32) - zero[:, :, None]) * s32[:, :, None] - grouped).sum(axis=2)
        if best is None:
            best = scale, zero, err
        else:
            better = err < best[2]
            best = np.where(better, scale, best[0]), np.where(better, zero, best[1]), np.where(better, err, best[2])
    return best[0], best[1]


def _round_asymmetric(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    return np.clip(np.rint(w / scale.astype(np.float32)) + zero, 0, 2 ** bits - 1).astype(np.int8)


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
            q = (_unpack_nibbles(q) if b == 4 else q)[:, :cols].astype(np.int16)
            scale = numpy_helper.to_array(inits[f"{base}.scales"]).reshape(rows, -1)
            if f"{base}.zero_points" in inits:  # asymmetric: the values as they are, a zero-point per block
                zero = _unpack_nibbles(numpy_helper.to_array(inits[f"{base}.zero_points"]).reshape(rows, -1))
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


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """``[rows, n]`` bytes -> ``[rows, 2n]`` values, low nibble first (``_pack_nibbles`` undone)."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)


# --------------------------------------------------------------------------- the model


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Linear and Embedding of the model, by parameter name of its weight."""
    from torch import nn

    return [(f"{name}.weight", m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]


def quantize_model(model: nn.Module, bits: int, block: int | None,
                   embedding_bits: int | None = None,
                   grams: dict[str, np.ndarray] | None = None,
                   asymmetric: bool = False) -> dict[str, QuantizedWeight]:
    """Quantize every Linear and Embedding weight on the grid, in the model's own
    dtype, and replace it in place by its dequantized value; returns the grid by
    parameter name (apply it to other copies of the model with ``apply_weights``).
    ``embedding_bits`` 8: the embedding table on the int8 grid (one scale per row).
    ``grams`` (``input_grams``): round the Linears with GPTQ (the embedding, which
    has no inputs to weigh, to nearest). ``asymmetric``: the Linears' blocks get a
    zero-point each (the embedding stays symmetric)."""
    import torch
    from torch import nn

    table = {}
    with torch.no_grad():
        for name, module in quantized_modules(model):
            w = module.weight.detach().cpu().numpy()
            if isinstance(module, nn.Embedding):
                table[name] = quantize(w, 8, None) if embedding_bits == 8 and bits != 8 else quantize(w, bits, block)
            elif grams is not None:
                table[name] = gptq(w, grams[name], bits, block, asymmetric)
            elif asymmetric:
                table[name] = quantize_asymmetric(w, bits, block)
            else:
                table[name] = quantize(w, bits, block)
    apply_weights(model, table)
    return table


def input_grams(model: nn.Module, ids: np.ndarray, window: int = CALIBRATION_WINDOW,
                limit: int = CALIBRATION_TOKENS) -> dict[str, np.ndarray]:
    """``E[x x^T]`` of every Linear's input (float64, ``[in, in]``) while ``model`` reads
    ``ids`` (1-D token ids, at most ``limit``) in windows of ``window``: what GPTQ weighs
    rounding errors with. The model should be the fp32 one the export starts from."""
    import torch
    from torch import nn

    ids = np.asarray(ids, np.int64)[:limit]
    if len(ids) < 2:
        raise SamoutError("the calibration text has fewer than 2 tokens")
    sums: dict[str, list] = {}

    def recorder(name: str):
        def record(x):
            flat = x.detach().reshape(-1, x.shape[-1]).double()
            entry = sums.setdefault(name, [0.0, 0])
            entry[0] = entry[0] + flat.T @ flat
            entry[1] += flat.shape[0]
            return x
        return record

    linears = {name: m for name, m in quantized_modules(model) if isinstance(m, nn.Linear)}
    with input_hooks(linears, recorder), torch.no_grad():
        for start in range(0, len(ids), window):
            chunk = ids[start:start + window]
            model(torch.from_numpy(chunk[None]))
    return {name: (total / count).numpy() for name, (total, count) in sums.items()}


def add_input_hooks(linears: dict[str, nn.Module], make) -> Callable[[], None]:
    """Every Linear in ``linears`` passes its input through ``make(name)`` first, whether
    the model calls it as a module (a forward pre-hook) or through models/model.py
    ``linear`` (its ``input_hook``). Returns what removes them."""
    handles = []
    for name, module in linears.items():
        hook = make(name)
        module.input_hook = hook
        handles.append(module.register_forward_pre_hook(lambda mod, args, h=hook: (h(args[0]), *args[1:])))

    def remove() -> None:
        for module in linears.values():
            module.__dict__.pop("input_hook", None)
        for handle in handles:
            handle.remove()
    return remove


@contextmanager
def input_hooks(linears: dict[str, nn.Module], make) -> Iterator[None]:
    remove = add_input_hooks(linears, make)
    try:
        yield
    finally:
        remove()


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
    half away from zero) instead of ``x86`` (AVX2/AVX-512: ``x * (127 / max|x|)``, ties to even),
    or ``fp``: no int8 inputs at all (an aarch64 CPU without the int8 dot product, ARMv8.0 or
    Xavier's Carmel: ONNX Runtime computes accuracy level 4 as level 1 there, in fp32)."""
    _ROUNDING.append(kernel)
    try:
        yield
    finally:
        _ROUNDING.pop()


_JITTER: list = [None]  # (generator, ulps) while activation_jitter is active


@contextmanager
def activation_jitter(ulps: float, seed: int) -> Iterator[None]:
    """Move every int8 input by up to ``ulps`` float32 ulps (uniform, seeded) before it is quantized:
    what another summation order upstream does to a kernel's inputs, so the roundings it flips
    show in an emulation (verify's bounds for int8 activations, exporter: int8_bounds)."""
    import torch

    _JITTER.append((torch.Generator().manual_seed(seed), ulps))
    try:
        yield
    finally:
        _JITTER.pop()


def quantize_activations(x, block: int):
    """What ONNX Runtime's MatMulNBits at accuracy level 4 does to its input (MLAS
    QuantizeARow_CompInt8): per block of ``block`` inputs, ``s = max|x| / 127`` and, on x86,
    ``q = round_half_even(x * (127 / max|x|))``; returns ``q * s`` in x's dtype. The true
    division matters: torch's ``127 / t`` is ``reciprocal(t) * 127``, an ulp off, and
    dequantized weights put many inputs exactly on .5."""
    import torch

    if _ROUNDING[-1] == "fp":
        return x
    shape, dtype = x.shape, x.dtype
    if _JITTER[-1] is not None:
        generator, ulps = _JITTER[-1]
        x = x.float() * (1 + (torch.rand(shape, generator=generator) * 2 - 1) * (ulps * 2.0 ** -23))
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
    (``export --activations int8``), for the model's lifetime."""
    from torch import nn

    linears = {name: m for name, m in quantized_modules(model) if isinstance(m, nn.Linear)}
    add_input_hooks(linears, lambda name: partial(quantize_activations, block=nbits_block(table[name])))


def grid_of(weights: Weights | None) -> tuple[int, int | None, int | None] | None:
    """(bits, block, embedding bits) of an export's quantized weights; None for float weights."""
    if weights is None or not weights.quantized:
        return None
    return weights.bits, weights.block_size, weights.embedding_bits


def quantize_like_export(model: nn.Module, weights: Weights | None, graph) -> None:
    """Give ``model`` (any dtype) the dequantized weights an export holds, read from its
    graph (``graph``: the onnx.ModelProto; ``read_grid``), and its
    int8 activations where it computes with them. No-op for float weights."""
    from torch import nn

    grid = grid_of(weights)
    if grid is None:
        return
    bits, _, embedding_bits = grid
    modules = quantized_modules(model)
    table = read_grid(graph, {name: tuple(m.weight.shape) for name, m in modules},
                      {name: embedding_bits if isinstance(m, nn.Embedding) else bits for name, m in modules})
    apply_weights(model, table)
    if weights.activations == "int8":
        set_int8_activations(model, table)
