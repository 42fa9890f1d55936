"""One-token decode latency of quantized exports against their fp32 export, on ONNX Runtime CPU.

All exports are loaded in one process and timed interleaved (the order
alternates every round), so load on a shared machine hits each the same; ORT's
intra-op spinning is off (see bench/suite.py). Each is first given a state of
--context tokens by one prefill call; then one decode call is timed repeatedly
from that same state.

    samout-edge export --preset seed --arch cummax --max-seq 1024 -o out/q/fp32
    samout-edge export --preset seed --arch cummax --max-seq 1024 --weights int4 -o out/q/int4
    python benchmarks/quant_decode.py out/q/fp32 out/q/int4 --json benchmarks/results/cpu-quant-decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np

from samout_edge.artifact.manifest import read_manifest
from samout_edge.bench.timing import Budget, interleaved
from samout_edge.runtime.ort_runner import load_ort_runner

TOKEN = np.asarray([[1]], dtype=np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+", type=Path, help="the fp32 export first, then the quantized ones")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0, help="timing budget per export")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    calls, labels, runners = {}, {}, []
    for directory in args.exports:
        m = read_manifest(directory)
        w = m.weights
        label = f"{m.arch} {w['kind']}" + (f" {w['format']}" if w.get("format") else "")
        runner = load_ort_runner(directory, "cpu", spinning=False)
        runners.append(runner)
        ids = rng.integers(0, m.config.vocab_size, (1, args.context))
        _, state = runner.run(ids, runner.initial_state(1))
        calls[str(directory)] = (lambda r=runner, s=state: r.run(TOKEN, s))
        labels[str(directory)] = (label, w.get("bytes") or os.path.getsize(directory / "model.onnx"))
    timings = interleaved(calls, Budget(warmup=5, min_repeats=30, max_repeats=100_000, seconds=args.seconds))
    base = timings[str(args.exports[0])].median_ms
    rows = []
    for key, t in timings.items():
        label, size = labels[key]
        rows.append({"export": key, "weights": label, "weights_mib": round(size / 2**20, 2),
                     "decode_ms_median": round(t.median_ms, 3), "ratio": round(t.median_ms / base, 3),
                     "repeats": len(t.samples_ms)})
        print(f"{label:28} {size / 2**20:7.2f} MiB  decode {t.median_ms:7.3f} ms  x{t.median_ms / base:.2f}  ({len(t.samples_ms)} runs)")
    if args.json:
        report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                  "context": args.context, "rows": rows}
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
