"""The Triton cummax kernel: exact on CUDA (marked gpu), and its logic checked in
Triton's CPU interpreter wherever Triton is installed."""

import os
import subprocess
import sys

import pytest
import torch

from samout_edge.kernels import triton_available

SHAPES = [((2, 4, 37, 8), 2), ((1, 8, 300, 4), 2), ((2, 8, 5, 16), 1), ((3, 1, 1, 5), 2), ((1, 2, 4999, 3), 2),
          ((8, 8, 8192, 64), 2), ((8, 8, 1000, 64), 1)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def test_block_sizes_fill_the_gpu():
    from samout_edge.kernels.tiling import block_sizes

    assert block_sizes(64, 8192, 64, 264) == (256, 16)  # [8,8,8192,64] on 132 SMs: 256 programs
    assert block_sizes(8, 8, 8192 * 64, 264) == (8, 64)  # head axis: plenty of columns
    bl, bq = block_sizes(1, 1, 5, 264)
    assert bl >= 2 and bq >= 8


def test_aot_block_sizes():
    """Compiled before shapes are known: a tight tile for a fixed short axis (heads), the long-sequence tile otherwise."""
    from samout_edge.kernels.tiling import TILE_ELEMENTS, aot_block_sizes

    assert aot_block_sizes(None) == (256, 16)
    assert aot_block_sizes(8) == (8, 64) and aot_block_sizes(1) == (2, 64) and aot_block_sizes(5) == (8, 64)
    assert all(bl * bq <= TILE_ELEMENTS for bl, bq in map(aot_block_sizes, (None, 1, 8, 64, 4096)))


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed (it ships with CUDA builds of torch; "
                                                     "CI installs it as a dev package)")
def test_kernel_logic_in_the_triton_interpreter():
    """The kernel itself, run by Triton's CPU interpreter: bit-exact, NaN propagated, with the
    eager tiles and the plugin's ahead-of-time tiles. TRITON_INTERPRET must be set before
    triton is imported, so this runs in a fresh interpreter."""
    script = """
import torch
from samout_edge.kernels.triton_cummax import cummax
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for shape, dim in [((2, 4, 37, 8), 2), ((1, 8, 300, 4), 2), ((2, 8, 5, 16), 1), ((3, 1, 1, 5), 2)]:
        x = torch.randn(shape).to(dtype)
        want, got = torch.cummax(x, dim).values, cummax(x, dim)
        view = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(got.view(view), want.view(view)), (dtype, shape, dim)
x = torch.randn(1, 1, 40, 2)
x[0, 0, 5, 0] = float("nan")
assert torch.equal(torch.cummax(x, 2).values.isnan(), cummax(x, 2).isnan())
# the tiles the TensorRT plugin compiles ahead of time (kernels.tiling.aot_block_sizes)
import triton
from samout_edge.kernels.tiling import aot_block_sizes, split_shape
from samout_edge.kernels.triton_cummax import cummax_kernel
for shape, dim, static in [((2, 8, 37, 16), 1, 8), ((1, 4, 300, 8), 2, None), ((3, 5, 7), 2, None)]:
    x = torch.randn(shape).to(torch.float16)
    y = torch.empty_like(x)
    P, L, Q = split_shape(shape, dim)
    bl, bq = aot_block_sizes(static)
    cummax_kernel[(P * triton.cdiv(Q, bq),)](x, P, L, Q, y, BLOCK_L=bl, BLOCK_Q=bq)
    assert torch.equal(y.view(torch.int16), torch.cummax(x, dim).values.view(torch.int16)), (shape, dim)
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", SHAPES)
def test_kernel_bit_exact_on_cuda(shape, dim, dtype):
    from samout_edge.kernels.triton_cummax import cummax

    x = torch.randn(shape, device="cuda").to(dtype)
    assert torch.equal(bits(cummax(x, dim)), bits(torch.cummax(x, dim).values))


@pytest.mark.gpu
def test_torch_runner_uses_the_kernel_on_cuda(exported):
    import numpy as np

    from samout_edge.runtime.registry import LoadOptions, load_runner

    d = exported().directory
    fast = load_runner(d, "torch", LoadOptions(device="cuda"))
    cpu = load_runner(d, "torch", LoadOptions(device="cpu"))
    assert fast.info.device == "cuda+triton"
    ids = np.random.default_rng(0).integers(1, 128, (2, 77))
    a = fast.to_numpy(fast.run(ids, fast.initial_state(2))[0])
    b = cpu.to_numpy(cpu.run(ids, cpu.initial_state(2))[0])
    assert np.abs(a - b).max() < 1e-4 * max(1.0, np.abs(b).max())
