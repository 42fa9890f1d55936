"""What prefill in micro-batches costs and saves: a prompt of N tokens fed in calls of --ubatch
tokens (the state carried, exact) against calls as long as the graph takes (max_seq), timed
interleaved in one process, and the peak memory above the loaded model of each, measured in a
fresh child process as `samout-edge bench` measures it. Medians and their ratio.

    .venv/bin/python benchmarks/ubatch_cost.py out/seed-cummax-4k --tokens 4096 [--ubatch 512]
        [--rounds 7] [--threads 1] [--json J.json] [--markdown M.md]

--tokens and --ubatch take comma-separated lists (--ubatch 128,256,512): every micro-batch and
calls of max_seq are timed interleaved at each length.
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


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--tokens", type=_ints, default=[4096], help="prompt lengths, comma-separated")
    parser.add_argument("--ubatch", type=_ints, default=[512], help="micro-batches, comma-separated")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    settings = {"provider": "cpu", "intra_op_threads": args.threads, "spinning": False}
    runner = load_runner(args.export, "ort", Settings(**settings))
    whole = f"calls of max_seq ({runner.info.max_seq})"
    forms = {**{f"calls of {u}": u for u in args.ubatch}, whole: None}
    lines = [f"prefill, {args.export.name}, {describe()['label']}, ONNX Runtime CPU, {args.threads} thread(s), "
             f"{args.rounds} interleaved rounds; peak: a fresh process, MiB above the loaded model", "",
             "| tokens | calls | median ms | time vs calls of max_seq | peak MiB above the model |",
             "|---:|---|---:|---:|---:|"]
    results = []
    for tokens in args.tokens:
        ids = np.random.default_rng(0).integers(1, runner.info.config.vocab_size, (1, tokens))
        times: dict[str, list[float]] = {name: [] for name in forms}
        for round_ in range(args.rounds + 1):
            for name, ubatch in forms.items():
                runner.ubatch = ubatch
                t = time.perf_counter()
                runner.run(ids, runner.initial_state(1))
                if round_:  # the first round warms up
                    times[name].append((time.perf_counter() - t) * 1e3)
        for name, ubatch in forms.items():
            spec = MemorySpec(str(args.export), "ort", "cpu", "prefill", 1, tokens, settings=settings, ubatch=ubatch)
            peak = measure_in_child(spec)
            median = statistics.median(times[name])
            ratio = median / statistics.median(times[whole])
            mib = None if peak is None else peak / 2**20
            results.append({"tokens": tokens, "calls": name, "ubatch": ubatch, "median_ms": median,
                            "ratio": ratio, "peak_mib": mib})
            lines.append(f"| {tokens:,} | {name} | {median:.1f} | x{ratio:.3f} | "
                         f"{'-' if mib is None else f'{mib:.1f}'} |")
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    save_results({"machine": describe(), "export": str(args.export), "threads": args.threads, "rounds": args.rounds,
                  "results": results}, markdown, args.json, args.markdown)


if __name__ == "__main__":
    main()
