"""The machine's memory bandwidth, measured the same way every time: the roofline of decode.

A decode step reads every weight it multiplies by once (all but the embedding
table, of which it reads one row per token) and reads and writes its state, so
its floor is those bytes over the memory bandwidth. The bandwidth is what a
parallel copy of a buffer far larger than any cache moves per second, read plus
write, one slice per core (numpy's copy releases the GIL), the best of a few
runs: what the cores together can stream, as STREAM's Copy kernel measures it.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

COPY_BYTES = 256 << 20  # per buffer: far above any L3
RUNS = 5


@dataclass(frozen=True)
class Bandwidth:
    gb_per_s: float  # bytes read + written per second, / 1e9
    threads: int
    buffer_bytes: int
    runs: int
    method: str = "parallel numpy copy, read + write bytes, best of runs"

    def to_dict(self) -> dict:
        return asdict(self)


def measure_bandwidth(buffer_bytes: int = COPY_BYTES, runs: int = RUNS, threads: int | None = None) -> Bandwidth:
    threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    n = buffer_bytes // 8
    src = np.ones(n, np.float64)  # touched, so the pages exist before timing
    dst = np.zeros(n, np.float64)
    bounds = np.linspace(0, n, threads + 1).astype(int)
    slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def part(s: slice) -> None:
        np.copyto(dst[s], src[s])

    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(part, slices))  # warm-up
        for _ in range(runs):
            t = time.perf_counter()
            list(pool.map(part, slices))
            best = min(best, time.perf_counter() - t)
    return Bandwidth(round(2 * n * 8 / best / 1e9, 2), threads, n * 8, runs)


def decode_step_bytes(weights_bytes: int, parameters: int, embedding_parameters: int, state_bytes: int) -> int:
    """Bytes one decode step must move: every weight but the embedding table (one row of
    it, negligible), as stored (its share of the stored bytes), plus the state read and
    the new state written."""
    share = (parameters - embedding_parameters) / parameters
    return int(weights_bytes * share) + 2 * state_bytes
