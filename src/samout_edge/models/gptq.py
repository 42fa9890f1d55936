"""GPTQ (Frantar et al., 2022): each column of a weight rounded onto the grid (grid.py)
knowing the inputs it will meet, its rounding error spread onto the columns not yet
rounded. The inputs' Gram matrices come from models/quantize.py ``input_grams``.
"""

from __future__ import annotations

import numpy as np

from samout_edge.errors import SamoutError
from samout_edge.models.grid import (
    QuantizedWeight,
    best_asymmetric,
    best_scales,
    check_weight,
    qmax,
    round_asymmetric,
)

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
    check_weight(w, "gptq")
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
                q[:, i] = round_asymmetric(part[:, j], s32, zero[:, b], bits)
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
