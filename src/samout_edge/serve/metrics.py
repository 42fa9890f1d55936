"""Prometheus text exposition (format 0.0.4) for the server, without a client library:
counters, gauges and histograms are a few lines each, and the device install
stays small."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), " ")}"'
               for k, v in sorted(labels.items()))
    return "{" + ",".join(escaped) + "}"


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(init=False)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.n += 1


class Metrics:
    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]] | None = None):
        self.lock = threading.Lock()
        self.counters: dict[str, tuple[str, dict[tuple, float]]] = {}
        self.histograms: dict[str, tuple[str, dict[tuple, Histogram], tuple[float, ...]]] = {}
        self.gauges = gauges or {}

    def counter(self, name: str, help_text: str) -> None:
        self.counters[name] = (help_text, {})

    def histogram(self, name: str, help_text: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.histograms[name] = (help_text, {}, buckets)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            series = self.counters[name][1]
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            _, series, buckets = self.histograms[name]
            series.setdefault(key, Histogram(buckets)).observe(value)

    def render(self) -> str:
        lines = []
        with self.lock:
            for name, (help_text, series) in self.counters.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
                lines += [f"{name}{_labels(dict(k))} {v:g}" for k, v in series.items()]
            for name, (help_text, series, _) in self.histograms.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
                for key, h in series.items():
                    labels, running = dict(key), 0
                    for bound, count in zip(h.buckets, h.counts):
                        running += count
                        lines.append(f"{name}_bucket{_labels({**labels, 'le': f'{bound:g}'})} {running}")
                    lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {h.n}")
                    lines += [f"{name}_sum{_labels(labels)} {h.total:.9g}", f"{name}_count{_labels(labels)} {h.n}"]
        for name, (help_text, read) in self.gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {read():g}"]
        return "\n".join(lines) + "\n"
