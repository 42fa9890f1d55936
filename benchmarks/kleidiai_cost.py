"""What `mlas.disable_kleidiai=1` (the session config an --activations int8 export carries) costs:
one-token decode steps of an export with the entry and without it, interleaved in one process,
medians and their ratio. On x86 ONNX Runtime does not read the key (KleidiAI is an aarch64
kernel library), so the ratio there says only that nothing else moved.

    .venv/bin/python benchmarks/kleidiai_cost.py out/seed-cummax-int4-a8 [--steps 300] [--json J.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from samout_edge.artifact import graph
from samout_edge.artifact.manifest import MODEL_FILE, read_manifest
from samout_edge.bench.machine import describe
from samout_edge.bench.report import save_results
from samout_edge.runtime.ort_runner import DISABLE_KLEIDIAI


def session(directory: Path, kleidiai_off: bool):
    import onnxruntime as ort

    manifest = read_manifest(directory)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in manifest.weights.ort_session_config.items():
        if key != DISABLE_KLEIDIAI:
            options.add_session_config_entry(key, value)
    if kleidiai_off:
        options.add_session_config_entry(DISABLE_KLEIDIAI, "1")
    return ort.InferenceSession(str(directory / MODEL_FILE), options, providers=["CPUExecutionProvider"]), manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = {name: session(args.export, off) for name, off in (("KleidiAI allowed", False), ("KleidiAI off", True))}
    times: dict[str, list[float]] = {name: [] for name in runs}
    ids = np.array([[5]], np.int64)
    for step in range(args.steps + 20):
        for name, (sess, manifest) in runs.items():
            feed = {graph.INPUT_IDS: ids, **graph.empty_state(manifest.config, manifest.spec, 1, manifest.dtype)}
            t = time.perf_counter()
            sess.run(None, feed)
            if step >= 20:  # warm-up
                times[name].append((time.perf_counter() - t) * 1e3)
    medians = {name: statistics.median(v) for name, v in times.items()}
    ratio = medians["KleidiAI off"] / medians["KleidiAI allowed"]
    markdown = (f"one-token decode of {args.export.name}, {describe()['label']}, ONNX Runtime CPU, 1 process, interleaved, "
                f"{args.steps} steps each: KleidiAI allowed {medians['KleidiAI allowed']:.3f} ms, "
                f"off {medians['KleidiAI off']:.3f} ms (x{ratio:.3f})\n")
    print(markdown)
    save_results({"machine": describe(), "export": str(args.export), "medians_ms": medians, "ratio": ratio},
                 markdown, args.json, args.markdown)


if __name__ == "__main__":
    main()
