"""Wall-clock timing with warm-up, interleaving and a time budget.

Both archs are timed in the same loop, alternating which goes first each round
(A B B A ...), so drift in clock speed or background load hits both alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class Timing:
    samples_ms: list[float]

    @property
    def median_ms(self) -> float:
        return float(np.median(self.samples_ms))

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.samples_ms, 90))


@dataclass
class Budget:
    warmup: int = 2
    min_repeats: int = 3
    max_repeats: int = 20
    seconds: float = 3.0  # per series, after warm-up

    def total_calls(self) -> int:
        return self.warmup + self.max_repeats


def interleaved(
    calls: dict[str, Callable[[], None]],
    budget: Budget,
    synchronize: Callable[[], None] = lambda: None,
) -> dict[str, Timing]:
    """Time each call repeatedly, alternating the order every round."""
    names = list(calls)
    for _ in range(budget.warmup):
        for name in names:
            calls[name]()
    synchronize()
    samples: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    rounds = 0
    while rounds < budget.max_repeats:
        order = names if rounds % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.perf_counter()
            calls[name]()
            synchronize()
            samples[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
        if rounds >= budget.min_repeats and time.perf_counter() - started >= budget.seconds * len(names):
            break
    return {name: Timing(s) for name, s in samples.items()}
