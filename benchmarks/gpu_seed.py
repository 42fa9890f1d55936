"""Seed-size SamOut vs the softmax baseline in torch eager on one CUDA GPU (fp16).

Called by benchmarks/gpu_check.sh; needs only torch with CUDA (and Triton for the
fast cummax kernel), not the CLI's dependencies. Random weights (the seed preset:
vocab 10000, hidden 512, 8 heads, 6 layers), batch 1, last-token logits:
  op       cummax alone on [1, 8, L, 64]: Triton kernel, torch.cummax, a plain copy
           (the bandwidth limit): median ms, GB/s, fraction of copy, bit-exactness
  prefill  2k / 8k / 32k tokens: cummax with the Triton kernel, cummax with
           torch.cummax, softmax (SDPA)
  decode   one token after 1k / 32k tokens of context, same variants
Timing: CUDA events around each call, after warm-up, median of the repeats; peak
memory from torch.cuda.max_memory_allocated per measurement. Writes
gpu-seed.json and gpu-seed.md into --out.

    python benchmarks/gpu_seed.py --out DIR [--budget-s 150]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

PREFILL = (2048, 8192, 32768)
DECODE_AFTER = (1024, 32768)
OP_LENGTHS = (8192, 32768)


def _timed(fn, warmup: int, repeats: int, deadline: float) -> dict[str, Any]:
    """Median and p90 of CUDA-event times of fn(); stops early at the deadline."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
        if time.monotonic() > deadline and len(samples) >= 3:
            break
    samples.sort()
    return {"median_ms": statistics.median(samples), "p90_ms": samples[min(len(samples) - 1, int(0.9 * len(samples)))],
            "repeats": len(samples)}


def bench_op(deadline: float) -> list[dict[str, Any]]:
    import torch

    rows = []
    try:
        from samout_edge.kernels.triton_scan import cummax as triton_cummax
    except Exception as e:  # no Triton: torch.cummax and the copy only
        triton_cummax = None
        rows.append({"note": f"Triton kernel unavailable: {type(e).__name__}: {e}"})
    for length in OP_LENGTHS:
        x = torch.randn(1, 8, length, 64, device="cuda", dtype=torch.float16)
        want = torch.cummax(x, 2).values
        calls = {"copy": lambda x=x: x.clone(), "torch.cummax": lambda x=x: torch.cummax(x, 2).values}
        if triton_cummax is not None:
            calls["triton kernel"] = lambda x=x: triton_cummax(x, 2)
        nbytes = 2 * x.numel() * x.element_size()
        timings = {name: _timed(fn, 3, 30, deadline) for name, fn in calls.items()}
        copy_ms = timings["copy"]["median_ms"]
        for name, t in timings.items():
            exact = None if name == "copy" else bool(torch.equal(calls[name]().view(torch.int16), want.view(torch.int16)))
            rows.append({"shape": [1, 8, length, 64], "dtype": "fp16", "candidate": name, **t,
                         "gb_per_s": nbytes / (t["median_ms"] / 1e3) / 1e9,
                         "fraction_of_copy": copy_ms / t["median_ms"], "exact": exact})
    return rows


def _model(arch: str):
    import torch

    from samout_edge.artifact.config import preset
    from samout_edge.models.model import SamOut

    torch.manual_seed(0)
    return SamOut(preset("seed"), arch).to(device="cuda", dtype=torch.float16).eval()


def _set_kernel(fast: bool) -> bool:
    """The Triton cummax for eager models on CUDA, or torch.cummax."""
    from samout_edge.models.ops import FAST_KERNELS

    if not fast:
        FAST_KERNELS.pop("cuda", None)
        return True
    try:
        from samout_edge.kernels import enable_fast_cummax

        return enable_fast_cummax()
    except Exception:
        return False


def bench_model(deadline: float) -> list[dict[str, Any]]:
    import torch

    variants = [("cummax", "triton kernel", True), ("cummax", "torch.cummax", False), ("softmax", "sdpa", False)]
    rows: list[dict[str, Any]] = []
    vocab = 10000
    for arch, label, fast in variants:
        if not _set_kernel(fast):
            rows.append({"arch": arch, "variant": label, "note": "Triton kernel unavailable"})
            continue
        model = _model(arch)
        with torch.inference_mode():
            for seq in PREFILL:
                ids = torch.randint(1, vocab, (1, seq), device="cuda")
                torch.cuda.reset_peak_memory_stats()
                t = _timed(lambda ids=ids, model=model: model(ids, None, last_only=True), 2, 10, deadline)
                rows.append({"mode": "prefill", "tokens": seq, "arch": arch, "variant": label, **t,
                             "peak_mib": torch.cuda.max_memory_allocated() / 2**20})
            for context in DECODE_AFTER:
                ids = torch.randint(1, vocab, (1, context), device="cuda")
                _, state = model(ids, None, last_only=True)
                step = torch.randint(1, vocab, (1, 1), device="cuda")
                torch.cuda.reset_peak_memory_stats()
                t = _timed(lambda state=state, step=step, model=model: model(step, state, last_only=True), 5, 50, deadline)
                rows.append({"mode": "decode", "tokens": context, "arch": arch, "variant": label, **t,
                             "peak_mib": torch.cuda.max_memory_allocated() / 2**20})
                del state
        del model
        torch.cuda.empty_cache()
    _set_kernel(True)
    return rows


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Seed-size SamOut vs softmax on {report['gpu']} (torch {report['torch']}, fp16, batch 1)", "",
             "CUDA-event medians; decode is one token after the given context; last-token logits.", "",
             "## cummax op, [1, 8, L, 64] fp16", "", "| L | candidate | median ms | GB/s | fraction of copy | bit-exact |",
             "|---|---|---|---|---|---|"]
    for r in report["op"]:
        if "candidate" in r:
            exact = "-" if r["exact"] is None else ("yes" if r["exact"] else "NO")
            lines.append(f"| {r['shape'][2]} | {r['candidate']} | {r['median_ms']:.3f} | {r['gb_per_s']:.0f} | "
                         f"{r['fraction_of_copy']:.2f} | {exact} |")
    lines += ["", "## model", "", "| mode | tokens | arch | variant | median ms | p90 ms | peak MiB |", "|---|---|---|---|---|---|---|"]
    for r in report["model"]:
        if "median_ms" in r:
            lines.append(f"| {r['mode']} | {r['tokens']} | {r['arch']} | {r['variant']} | {r['median_ms']:.2f} | "
                         f"{r['p90_ms']:.2f} | {r['peak_mib']:.0f} |")
        else:
            lines.append(f"| - | - | {r['arch']} | {r['variant']} | {r.get('note', '')} | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=150.0, help="Stop repeating once this much time is spent.")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_seed: torch sees no CUDA device", file=sys.stderr)
        return 2
    started = time.monotonic()
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                              "capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}
    try:
        import triton

        report["triton"] = triton.__version__
    except Exception:
        report["triton"] = None
    report["op"] = bench_op(started + 0.25 * args.budget_s)
    report["model"] = bench_model(started + args.budget_s)
    report["seconds"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-seed.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu-seed.md").write_text(to_markdown(report))
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
