"""Applying the weight-only quantization grid to a model: every Linear and Embedding
weight put on its grid (grid.py; GPTQ: gptq.py, on the Gram matrices ``input_grams``
records), the dequantized weights applied to other copies, the input hooks that int8
activations and GPTQ's calibration share, the kernel's int8 activations emulated, and a
model given an export's grid read from its graph.

Below the runtime so that every PyTorch reference (the export's golden model,
``verify --lengths``, the torch runner of a quantized export) computes with the
same dequantized weights the graph holds. The scheme and the graph forms are
described in exporter/quantize.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from samout_edge.artifact.quantization import CALIBRATION_TOKENS, CALIBRATION_WINDOW, Weights
from samout_edge.errors import SamoutError
from samout_edge.models.gptq import gptq  # noqa: F401 - also this module's API
from samout_edge.models.grid import (  # noqa: F401 - the grid, as this module's users have imported it
    QuantizedWeight,
    dequantize,
    nbits_block,
    qmax,
    quantize,
    quantize_asymmetric,
    read_grid,
)

if TYPE_CHECKING:
    from torch import nn


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
