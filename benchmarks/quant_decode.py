"""Decode at the memory-bandwidth limit (issue 19): every precision and compute mode, both archs.

Speed, on the seed preset (hidden 512, 8 heads, 6 layers, vocab 10000; random
weights: speed does not depend on them): for cummax and softmax, exports at fp32,
fp16, int8, int4, and int8/int4 with int8 activations (``--activations int8``), all
loaded in one process; one-token decode after each --contexts is timed interleaved
(the order alternates every round, so load on a shared machine hits each alike),
ONNX Runtime CPU, intra-op spinning off ("cold": each step finds the caches full of
the other exports), and again in runs of consecutive steps of one export ("warm":
a generation loop's steps). Each row gets the bytes its step must move
(weights as stored but the embedding table, the state in and out) and the fraction
of the machine's memory bandwidth that is (bench/bandwidth.py), as bench reports it.

Quality, on the trained set (benchmarks/trained/: cummax and softmax): the same
precisions exported from the trained checkpoints and scored by eval on held-out text
against PyTorch fp32: the cost in bits per byte and the mean KL; each quantized one
twice, rounded to nearest (rtn) and with GPTQ calibrated on 64 KiB of the training
text (``--quantizer gptq --calibration-text``: the same file form, so the same speed).

    .venv/bin/python benchmarks/quant_decode.py [--contexts 256,4096] [--seconds 6] \\
        [--json benchmarks/results/cpu-quant-decode.json] [--markdown benchmarks/results/cpu-quant-decode.md]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from samout_edge.artifact import graph
from samout_edge.artifact.manifest import read_manifest
from samout_edge.bench.bandwidth import decode_step_bytes, measure_bandwidth
from samout_edge.bench.machine import describe
from samout_edge.bench.report import save_results
from samout_edge.bench.timing import Budget, interleaved
from samout_edge.evaluate import eval_target
from samout_edge.exporter.onnx_export import ExportOptions, export
from samout_edge.runtime.ort_runner import load_ort_runner

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("cummax", "softmax")
VARIANTS = {  # name -> ExportOptions fields
    "fp32": dict(),
    "fp16": dict(dtype="fp16"),
    "int8": dict(weights="int8"),
    "int4": dict(weights="int4"),
    "int4 asymmetric": dict(weights="int4", weights_grid="asymmetric"),
    "int8, int8 compute": dict(weights="int8", activations="int8"),
    "int4, int8 compute": dict(weights="int4", activations="int8"),
    "int4 asymmetric, int8 compute": dict(weights="int4", weights_grid="asymmetric", activations="int8"),
}
TOKEN = np.asarray([[1]], dtype=np.int64)


def source_digest() -> str:
    """Of samout-edge's own sources: an export made by other code is made again."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "src" / "samout_edge").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def made(target: Path, options: ExportOptions, **source) -> Path:
    """An export, made once: kept in --work and reused while its options, source and the code are the same."""
    stamp = target / ".options.json"
    want = json.dumps({**options.__dict__, **{k: str(v) for k, v in source.items()}, "code": source_digest()},
                      sort_keys=True, default=str)
    if stamp.is_file() and stamp.read_text() == want:
        return target
    t = time.perf_counter()
    export(target, options, force=True, **source)
    stamp.write_text(want)
    print(f"exported {target.name} in {time.perf_counter() - t:.0f} s", flush=True)
    return target


def speed(work: Path, contexts: list[int], seconds: float, preset: str = "seed") -> tuple[list[dict], dict]:
    bandwidth = measure_bandwidth()
    print(f"memory bandwidth: {bandwidth.gb_per_s:.1f} GB/s ({bandwidth.threads} threads)", flush=True)
    dirs = {(arch, name): made(work / preset / f"{arch}-{name.replace(', ', '-').replace(' ', '')}",
                               ExportOptions(arch=arch, max_seq=max(contexts) + 1, **options), preset_name=preset)
            for arch in ARCHS for name, options in VARIANTS.items()}
    rows = []
    rng = np.random.default_rng(0)
    for context in contexts:
        calls, runners = {}, {}
        for key, d in dirs.items():
            runner = load_ort_runner(d, "cpu", spinning=False)
            runners[key] = runner
            m = read_manifest(d)
            _, state = runner.run(rng.integers(1, m.config.vocab_size, (1, context)), runner.initial_state(1))
            calls[key] = lambda r=runner, s=state: r.run(TOKEN, s)
        timings = interleaved(calls, Budget(warmup=3, min_repeats=20, max_repeats=100_000, seconds=seconds))
        warm = consecutive(calls)
        for (arch, name), t in timings.items():
            m = read_manifest(dirs[(arch, name)])
            cfg = m.config
            state = graph.state_bytes(cfg, m.spec, 1, context, m.dtype)
            step = decode_step_bytes(m.weights.bytes, cfg.parameter_count(), cfg.vocab_size * cfg.hidden_size, state)
            fp32, warm_fp32 = timings[(arch, "fp32")].median_ms, warm[(arch, "fp32")]
            rows.append({"arch": arch, "variant": name, "context": context, "decode_ms": round(t.median_ms, 3),
                         "x_fp32": round(t.median_ms / fp32, 3), "warm_ms": round(warm[(arch, name)], 3),
                         "warm_x_fp32": round(warm[(arch, name)] / warm_fp32, 3),
                         "weights_mib": round(m.weights.bytes / 2**20, 2),
                         "step_bytes": step, "roofline": round(step / (bandwidth.gb_per_s * 1e9) / (t.median_ms / 1e3), 3),
                         "repeats": len(t.samples_ms)})
            print(f"{arch:7} {name:20} context {context:5}: {t.median_ms:7.3f} ms  x{t.median_ms / fp32:.2f}  "
                  f"roofline {rows[-1]['roofline']:.0%}; warm {warm[(arch, name)]:.3f} ms "
                  f"x{rows[-1]['warm_x_fp32']:.2f}", flush=True)
        for runner in runners.values():
            runner.close()
    return rows, bandwidth.to_dict()


WARM_STEPS, WARM_ROUNDS = 20, 20


def consecutive(calls: dict, steps: int = WARM_STEPS, rounds: int = WARM_ROUNDS) -> dict:
    """Median ms of a step that follows a step of the same model (a generation loop's),
    in runs of ``steps`` per model, the models taking turns (the order alternating every
    round, as ``interleaved`` does): the first step of each run, which found the caches
    full of another model, is left out."""
    names = list(calls)
    samples: dict = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            for i in range(steps):
                t0 = time.perf_counter()
                calls[name]()
                if i:
                    samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: float(np.median(s)) for name, s in samples.items()}


def quality(work: Path, set_dir: Path, text: Path, calibration: Path) -> list[dict]:
    rows = []
    for arch in ARCHS:
        for name, options in VARIANTS.items():
            quantizers = ["rtn", "gptq"] if options.get("weights") else ["auto"]
            for quantizer in quantizers:
                extra = {} if quantizer == "auto" else {"quantizer": quantizer}
                if quantizer == "gptq":
                    extra["calibration_text"] = calibration
                tag = "" if quantizer in ("auto", "rtn") else "-gptq"
                d = made(work / "trained" / f"{arch}-{name.replace(', ', '-').replace(' ', '')}{tag}",
                         ExportOptions(arch=arch, max_seq=256, logits="all", **options, **extra),
                         checkpoint=set_dir / arch, vocab="bytes")
                r = eval_target(d, text, window=256)
                rows.append({"arch": arch, "variant": name, "quantizer": None if quantizer == "auto" else quantizer,
                             "bits_per_byte": r.bits_per_byte, "cost_bits_per_byte": r.cost_bits_per_byte,
                             "kl_from_fp32": r.kl_from_fp32, "top1_agreement": r.top1_agreement,
                             "compared_tokens": r.compared_tokens})
                print(f"{arch:7} {name:20} {quantizer:5} {r.bits_per_byte:.4f} bits/byte, cost "
                      f"{r.cost_bits_per_byte:+.4f}, KL {r.kl_from_fp32:.5f}", flush=True)
    return rows


def to_markdown(report: dict) -> str:
    contexts = report["contexts"]
    cost: dict[tuple, dict] = {}
    for q in report["quality"]:
        cost.setdefault((q["arch"], q["variant"]), {})[q.get("quantizer")] = q
    speed = {(r["arch"], r["variant"], r["context"]): r for r in report["speed"]}
    head = (["arch", "weights, compute", "weights MiB"]
            + [x for c in contexts for x in (f"cold decode ms @{c} (x fp32, roofline)", f"warm @{c} (x fp32)")]
            + ["cost bits/byte rtn / gptq", "mean KL rtn / gptq"])
    lines = [f"Machine: {report['machine']['label']}; memory bandwidth {report['bandwidth']['gb_per_s']:.1f} GB/s "
             f"({report['bandwidth']['method']}). Decode: {report['preset']} preset, ONNX Runtime CPU, batch 1, one token after the "
             "context; cold: the exports take turns call by call (each step finds the caches full of other models: "
             "weights come from memory, the roofline's premise); warm: a step after a step of the same model, as a "
             "generation loop runs (what fits in cache stays there); medians. Cost: the trained set, eval over {report['text_bytes']:,} bytes of "
             "held-out text in windows of 256, against PyTorch fp32; quantized weights rounded to nearest (rtn) and "
             f"with GPTQ on {report.get('calibration_bytes', 0):,} bytes of training text (gptq: the same file form and "
             "speed).", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for arch in ARCHS:
        for name in VARIANTS:
            first = speed[(arch, name, contexts[0])]
            cells = [arch, name, f"{first['weights_mib']:.1f}"]
            for c in contexts:
                r = speed[(arch, name, c)]
                cells.append(f"{r['decode_ms']:.2f} ({r['x_fp32']:.2f}x, {r['roofline']:.0%})")
                cells.append(f"{r['warm_ms']:.2f} ({r['warm_x_fp32']:.2f}x)")
            q = cost.get((arch, name), {})
            if not q:
                cells += ["-", "-"]
            elif None in q:
                cells += [f"{q[None]['cost_bits_per_byte']:+.4f}", f"{q[None]['kl_from_fp32']:.4f}"]
            else:
                cells += [f"{q['rtn']['cost_bits_per_byte']:+.4f} / {q['gptq']['cost_bits_per_byte']:+.4f}",
                          f"{q['rtn']['kl_from_fp32']:.4f} / {q['gptq']['kl_from_fp32']:.4f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="256,4096")
    parser.add_argument("--seconds", type=float, default=6.0, help="timing budget per export and context")
    parser.add_argument("--set", type=Path, default=ROOT / "benchmarks" / "trained")
    parser.add_argument("--text", type=Path, help="held-out text (default: 64 KiB from the set's heldout.txt)")
    parser.add_argument("--calibration-text", type=Path,
                        help="GPTQ's calibration text (default: 64 KiB of the set's training text)")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "quant-decode")
    parser.add_argument("--preset", default="seed", help="the model timed (default seed)")
    parser.add_argument("--no-quality", action="store_true", help="time only")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    text = args.text or args.work / "heldout.txt"
    if args.text is None:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_set.py"), "--out", str(args.set),
                        "--write-heldout", str(text), "--max-bytes", str(64 << 10)], check=True)
    calibration = args.calibration_text or args.work / "calibration.txt"
    if args.calibration_text is None and not args.no_quality:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_set.py"), "--out", str(args.set),
                        "--write-training-sample", str(calibration), "--max-bytes", str(64 << 10)], check=True)
    contexts = [int(c) for c in args.contexts.split(",")]
    rows, bandwidth = speed(args.work, contexts, args.seconds, args.preset)
    report = {"machine": describe("cpu"), "preset": args.preset, "bandwidth": bandwidth, "contexts": contexts,
              "speed": rows, "quality": [] if args.no_quality else quality(args.work, args.set, text, calibration),
              "text_bytes": text.stat().st_size,
              "calibration_bytes": None if args.no_quality else calibration.stat().st_size}
    md = to_markdown(report)
    print(md)
    save_results(report, md, args.json, args.markdown)


if __name__ == "__main__":
    main()
