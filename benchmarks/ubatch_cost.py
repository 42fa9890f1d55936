"""What prefill in micro-batches costs and saves: a prompt of N tokens fed in calls of --ubatch
tokens (the state carried, exact) against calls as long as the graph takes (max_seq), timed
interleaved in one process, and the peak memory above the loaded model of each, measured in a
fresh child process as `samout-edge bench` measures it. Medians and their ratio.

    .venv/bin/python benchmarks/ubatch_cost.py out/seed-cummax-4k --tokens 4096 [--ubatch 512]
        [--rounds 7] [--threads 1] [--json J.json] [--markdown M.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from samout_edge.bench.machine import describe
from samout_edge.bench.peak_memory import MemorySpec, measure_in_child
from samout_edge.bench.report import save_results
from samout_edge.runtime.registry import Settings, load_runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ubatch", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    settings = {"provider": "cpu", "intra_op_threads": args.threads, "spinning": False}
    runner = load_runner(args.export, "ort", Settings(**settings))
    forms = {f"calls of {args.ubatch}": args.ubatch, f"calls of max_seq ({runner.info.max_seq})": None}
    ids = np.random.default_rng(0).integers(1, runner.info.config.vocab_size, (1, args.tokens))
    times: dict[str, list[float]] = {name: [] for name in forms}
    for round_ in range(args.rounds + 1):
        for name, ubatch in forms.items():
            runner.ubatch = ubatch
            t = time.perf_counter()
            runner.run(ids, runner.initial_state(1))
            if round_:  # the first round warms up
                times[name].append((time.perf_counter() - t) * 1e3)
    peaks = {}
    for name, ubatch in forms.items():
        spec = MemorySpec(str(args.export), "ort", "cpu", "prefill", 1, args.tokens, settings=settings, ubatch=ubatch)
        peaks[name] = measure_in_child(spec)
    medians = {name: statistics.median(v) for name, v in times.items()}
    small, whole = forms
    ratio = medians[small] / medians[whole]
    mib = {name: None if p is None else p / 2**20 for name, p in peaks.items()}
    markdown = "\n".join([
        f"prefill of {args.tokens:,} tokens, {args.export.name}, {describe()['label']}, ONNX Runtime CPU, "
        f"{args.threads} thread(s), {args.rounds} interleaved rounds:",
        "",
        "| calls | median ms | peak MiB above the model |",
        "|---|---|---|",
        *(f"| {name} | {medians[name]:.1f} | {mib[name]:.1f} |" if mib[name] is not None
          else f"| {name} | {medians[name]:.1f} | - |" for name in forms),
        "",
        f"time ratio (micro-batches / whole calls): x{ratio:.3f}",
        "",
    ])
    print(markdown)
    save_results({"machine": describe(), "export": str(args.export), "tokens": args.tokens, "threads": args.threads,
                  "medians_ms": medians, "ratio": ratio, "peak_mib": mib}, markdown, args.json, args.markdown)


if __name__ == "__main__":
    main()
