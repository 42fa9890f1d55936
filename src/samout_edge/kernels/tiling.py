"""How the cummax kernel tiles a tensor: pure arithmetic, testable without a GPU."""

from __future__ import annotations

import math

TILE_ELEMENTS = 4096  # BLOCK_L * BLOCK_Q: 16 KiB of fp32 per tile
MIN_BLOCK_Q = 16


def _pow2_at_most(n: int) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(n, 1)))))


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def split_shape(shape: tuple[int, ...], dim: int) -> tuple[int, int, int]:
    """[P, L, Q] around the scan axis of a contiguous tensor."""
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :])


def block_sizes(P: int, L: int, Q: int, programs_wanted: int) -> tuple[int, int]:
    """BLOCK_Q as wide as 64 columns, narrowed until there are enough programs to
    fill the GPU; BLOCK_L fills the rest of a TILE_ELEMENTS tile."""
    block_q = min(64, _pow2_at_least(Q))
    while block_q > MIN_BLOCK_Q and P * math.ceil(Q / block_q) < programs_wanted:
        block_q //= 2
    block_l = max(2, min(_pow2_at_least(L), _pow2_at_most(TILE_ELEMENTS // block_q)))
    return block_l, block_q


def aot_block_sizes(static_len: int | None) -> tuple[int, int]:
    """Tiles for a kernel compiled before the shapes are known (the TensorRT plugin).

    A scan axis whose length the graph fixes (the head axis) gets a tile just tall
    enough for it and wide rows; a dynamic one (the sequence) gets the long-sequence
    tile, 16 columns x 256 rows, as block_sizes picks for [8, 8, 8192, 64].
    """
    if static_len is not None and static_len >= 1:
        block_q = 64
        return max(2, min(_pow2_at_least(static_len), TILE_ELEMENTS // block_q)), block_q
    return TILE_ELEMENTS // MIN_BLOCK_Q, MIN_BLOCK_Q
