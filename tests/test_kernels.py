"""The Triton scan kernels (cummax, the linear recurrence): checked on CUDA (marked gpu),
and their logic in Triton's CPU interpreter wherever Triton is installed."""

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
from samout_edge.kernels.triton_scan import cummax
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
from samout_edge.kernels.triton_scan import cummax_kernel
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


LINEAR_SCRIPT = """
import numpy as np, torch, triton
from samout_edge.kernels.tiling import aot_block_sizes, split_shape
from samout_edge.kernels.triton_scan import linear_scan, linear_scan_kernel
from samout_edge.scans import SCANS
s, rng, worst = SCANS["linear"], np.random.default_rng(0), {}
def error(a, b, dim, got):
    want = s.reference((a, b), dim)
    return float((np.abs(np.asarray(got, np.float64) - want) / np.maximum(1.0, np.abs(want))).max())
def check(name, a, b, dim, got, bound=None):
    err = error(a, b, dim, got.numpy())
    assert err <= (bound or s.tolerance[name]), (name, a.shape, dim, err, bound)
    worst[name] = max(worst.get(name, 0.0), err)
for dtype, name in ((np.float32, "fp32"), (np.float16, "fp16")):
    # eager tiles: lengths 1, short, long (5000 rows: several 1024-row tiles), and the head axis
    for shape, dim in [((1, 2, 1, 3), 2), ((2, 3, 37, 8), 2), ((1, 1, 5000, 3), 2), ((2, 8, 5, 16), 1)]:
        a, b = s.sample(rng, shape, dtype)
        check(name, a, b, dim, linear_scan(torch.from_numpy(a), torch.from_numpy(b), dim))
    # the plugin's sequence tile (256 rows): one tile -1, exactly one, one +1, and many
    bl, bq = aot_block_sizes(None)
    for length in (1, bl - 1, bl, bl + 1, 4 * bl + 3):
        shape = (1, 2, length, 5)
        a, b = s.sample(rng, shape, dtype)
        h = torch.empty(shape, dtype=torch.from_numpy(b).dtype)
        P, L, Q = split_shape(shape, 2)
        linear_scan_kernel[(P * triton.cdiv(Q, bq),)](torch.from_numpy(a), torch.from_numpy(b), P, L, Q, h,
                                                      BLOCK_L=bl, BLOCK_Q=bq)
        check(name, a, b, 2, h)
    # long memory (decays 1 - 10^U(-4, -1)), 3000 steps: past scans.py's fp32 bound even for the textbook
    # loop in fp32 (a * h + b, step by step), so held to no worse than twice that loop's error
    a = (1 - 10 ** rng.uniform(-4, -1, (1, 2, 3000, 4))).astype(dtype)
    b = rng.standard_normal((1, 2, 3000, 4)).astype(dtype)
    h, loop = np.zeros_like(b[:, :, 0], np.float32), np.empty(b.shape, np.float32)
    for t in range(b.shape[2]):
        h = a[:, :, t].astype(np.float32) * h + b[:, :, t]
        loop[:, :, t] = h
    loop_err = error(a, b, 2, loop.astype(dtype))
    check(name, a, b, 2, linear_scan(torch.from_numpy(a), torch.from_numpy(b), 2),
          max(s.tolerance[name], 2 * loop_err))
    worst[name + " long-memory fp32 loop"] = loop_err
# the eager fast path (registered here for the CPU interpreter): h0 folded in, equal to the blocked scan
from samout_edge.models import ops
a = torch.sigmoid(torch.randn(2, 3, 40, 4)); b, h0 = torch.randn(2, 3, 40, 4), torch.randn(2, 3, 1, 4)
want = ops.blocked_linear_scan(a, b, h0)
ops.FAST_LINEAR_KERNELS["cpu"] = linear_scan
assert torch.allclose(ops.linear_scan(a, b, h0), want, atol=1e-5)
assert torch.equal(ops.linear_scan(a.requires_grad_(), b, h0), want)  # training keeps the blocked scan (autograd)
print("ok", worst)
"""


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed (it ships with CUDA builds of torch; "
                                                     "CI installs it as a dev package)")
def test_linear_kernel_in_the_triton_interpreter():
    """The linear scan kernel in Triton's CPU interpreter, against scans.py's float64 loop of the
    recurrence at its stated tolerance: lengths 1, a tile -1/+1 and long, fp32 and fp16, the eager
    tiles and the plugin's; long memory against the fp32 loop's own error; and the eager fast path
    folding h0 in."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", LINEAR_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,dim", SHAPES)
def test_linear_kernel_on_cuda(shape, dim, dtype):
    import numpy as np

    from samout_edge.kernels.triton_scan import linear_scan
    from samout_edge.scans import SCANS

    s = SCANS["linear"]
    a, b = s.sample(np.random.default_rng(0), shape, np.float32 if dtype == torch.float32 else np.float16)
    got = linear_scan(torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda(), dim).cpu().numpy().astype(np.float64)
    want = s.reference((a, b), dim)
    err = (np.abs(got - want) / np.maximum(1.0, np.abs(want))).max()
    assert err <= s.tolerance["fp32" if dtype == torch.float32 else "fp16"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", SHAPES)
def test_kernel_bit_exact_on_cuda(shape, dim, dtype):
    from samout_edge.kernels.triton_scan import cummax

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
