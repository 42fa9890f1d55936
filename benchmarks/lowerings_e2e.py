"""SamOut end to end with each cummax implementation, timed in one interleaved loop.

`samout-edge bench` pairs the two archs; this script holds the arch fixed (the
seed-size SamOut, one checkpoint) and varies how cummax runs:
  ONNX Runtime: native/blocked (the default), native/doubling, custom (function body)
  torch eager:  torch.cummax, and on CUDA the Triton kernel
Prefill at 1024 and 4096 tokens, one decode step after 4096. Writes
benchmarks/results/<prefix>-lowerings-e2e.{json,md}.

    .venv/bin/python benchmarks/lowerings_e2e.py [--prefix cpu] [--work out/lowerings]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from samout_edge.artifact.config import preset
from samout_edge.artifact.manifest import read_manifest
from samout_edge.bench import machine
from samout_edge.bench.timing import Budget, interleaved
from samout_edge.exporter.onnx_export import ExportOptions, export
from samout_edge.models.checkpoint import random_checkpoint, save_checkpoint
from samout_edge.runtime.registry import LoadOptions, load_runner
from samout_edge.runtime.torch_runner import torch_device

VARIANTS = {"native/blocked": ("native", "blocked"), "native/doubling": ("native", "doubling"),
            "custom (function body)": ("custom", "blocked")}
PREFILL = [1024, 4096]
CONTEXT = 4096
MAX_SEQ = 4160


def exports(work: Path) -> dict[str, Path]:
    checkpoint = work / "checkpoint"
    if not checkpoint.is_dir():
        save_checkpoint(random_checkpoint(preset("seed"), seed=0), checkpoint)
    out = {}
    for name, (lowering, scan) in VARIANTS.items():
        target = work / f"{lowering}-{scan}"
        try:
            ok = read_manifest(target).max_seq == MAX_SEQ
        except Exception:
            ok = False
        if not ok:
            export(target, ExportOptions("cummax", lowering, scan, MAX_SEQ), checkpoint=checkpoint, force=True)
        out[name] = target
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", default="cpu")
    parser.add_argument("--work", default="out/lowerings", type=Path)
    args = parser.parse_args()
    dirs = exports(args.work)
    device = torch_device("auto")
    runners = {f"ort {name}": load_runner(d, "ort") for name, d in dirs.items()}
    first = next(iter(dirs.values()))
    runners[f"torch:{device} torch.cummax"] = load_runner(first, "torch", LoadOptions(device=device, fast_kernel=False))
    if device.startswith("cuda"):
        runners[f"torch:{device} triton kernel"] = load_runner(first, "torch", LoadOptions(device=device, fast_kernel=True))
    budget = Budget(warmup=1, min_repeats=5, max_repeats=10, seconds=4.0)
    rng = np.random.default_rng(0)
    rows = []
    for length in PREFILL:
        ids = rng.integers(1, 10000, (1, length))
        calls = {k: (lambda r=r, ids=ids: r.run(ids, r.initial_state(1))) for k, r in runners.items()}
        for name, t in interleaved(calls, budget, runners[next(iter(runners))].synchronize).items():
            rows.append({"candidate": name, "mode": "prefill", "tokens": length, "median_ms": t.median_ms, "p90_ms": t.p90_ms})
    ids = rng.integers(1, 10000, (1, CONTEXT + budget.total_calls() + 1))
    calls = {}
    for name, runner in runners.items():
        _, state = runner.run(ids[:, :CONTEXT], runner.initial_state(1))
        box = {"state": state, "pos": CONTEXT}

        def step(runner=runner, box=box) -> None:
            _, box["state"] = runner.run(ids[:, box["pos"] : box["pos"] + 1], box["state"])
            box["pos"] += 1

        calls[name] = step
    for name, t in interleaved(calls, budget).items():
        rows.append({"candidate": name, "mode": "decode", "tokens": CONTEXT, "median_ms": t.median_ms, "p90_ms": t.p90_ms})
    info = machine.describe(device)
    out = Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.prefix}-lowerings-e2e.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    lines = [f"SamOut seed preset (fp32, batch 1) end to end on {info['label']}, one interleaved loop; median ms.", "",
             "| candidate | prefill 1024 | prefill 4096 | decode after 4096 |", "|---|---|---|---|"]
    for name in runners:
        cells = [next(r for r in rows if r["candidate"] == name and r["mode"] == m and r["tokens"] == n)["median_ms"]
                 for m, n in (("prefill", 1024), ("prefill", 4096), ("decode", CONTEXT))]
        lines.append(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    (out / f"{args.prefix}-lowerings-e2e.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
