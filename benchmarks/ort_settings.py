"""Which ONNX Runtime session settings matter for batch-1 decode on a CPU (issue 19), and OpenVINO beside it.

For the seed preset's cummax exports at fp32, int4 and int4 with int8 compute, one-token
decode after --context tokens is timed interleaved (the order alternates every round)
under each setting: intra-op threads, intra-op spinning, the CPU memory arena, the
graph optimization level and weight pre-packing; then OpenVINO's CPU runtime on the
exports it can run (it has no MatMulNBits: fp32, and int8/int4 in the DequantizeLinear
form, whose weights it keeps compressed), as verified (f32, no dynamic quantization)
and in its own fast mode (its int8 dynamic quantization of activations, not verified
here); and ONNX Runtime's two int8-compute paths side by side: our MatMulNBits 8-bit at
accuracy level 4 and its own quantize_dynamic (DynamicQuantizeLinear + MatMulInteger).
One JSON and one Markdown table.

    .venv/bin/python benchmarks/ort_settings.py [--context 256] [--seconds 4] \\
        [--json benchmarks/results/cpu-ort-settings.json] [--markdown benchmarks/results/cpu-ort-settings.md]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from samout_edge.artifact.manifest import read_manifest
from samout_edge.bench.machine import describe
from samout_edge.bench.report import save_results
from samout_edge.bench.timing import Budget, interleaved
from samout_edge.exporter.onnx_export import ExportOptions, export
from samout_edge.runtime.ort_runner import OrtRunner

ROOT = Path(__file__).resolve().parents[1]
EXPORTS = {"fp32": dict(), "int4": dict(weights="int4"), "int4, int8 compute": dict(weights="int4", activations="int8")}
EXPORTS_TIMED_ONCE = {"int8, int8 compute": dict(weights="int8", activations="int8")}
OPENVINO_EXPORTS = {"int8 dq": dict(weights="int8", weights_format="dq"),
                    "int4 dq": dict(weights="int4", weights_format="dq"),
                    "int4 dq asymmetric": dict(weights="int4", weights_format="dq", weights_grid="asymmetric")}
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
# name -> (intra-op threads, spinning, arena, optimization level, pre-packing); the first is what bench uses
SETTINGS = {
    "bench default (all cores, no spinning)": (None, False, True, "all", True),
    "spinning on (ORT's default)": (None, True, True, "all", True),
    "1 thread": (1, False, True, "all", True),
    "arena off": (None, False, False, "all", True),
    "optimization basic": (None, False, True, "basic", True),
    "optimization extended": (None, False, True, "extended", True),
    "pre-packing off": (None, False, True, "all", False),
}
TOKEN = np.asarray([[1]], dtype=np.int64)


def session(directory: Path, threads, spinning, arena, level, prepack):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.enable_cpu_mem_arena = arena
    options.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    m = read_manifest(directory)
    for key, value in m.weights.ort_session_config.items():
        options.add_session_config_entry(key, value)
    return OrtRunner(ort.InferenceSession(str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"]),
                     m, "CPUExecutionProvider")


def dynamic_session(model: Path, fp32: Path) -> OrtRunner:
    """ONNX Runtime's quantize_dynamic output of the fp32 export, run as that export's graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return OrtRunner(ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"]),
                     read_manifest(fp32), "CPUExecutionProvider")


def openvino_runner(directory: Path, fast: bool):
    """OpenVINO as the export says (f32, no dynamic quantization: the verified function), or
    ``fast``: its CPU plugin's defaults for compressed weights (int8 dynamic quantization of
    the activations in groups of 32), timed only."""
    import openvino as ov

    from samout_edge.runtime.openvino_runner import OpenVINORunner, load_openvino_runner

    if not fast:
        return load_openvino_runner(directory, "CPU", "f32")
    compiled = ov.Core().compile_model(str(directory / "model.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                                                "DYNAMIC_QUANTIZATION_GROUP_SIZE": "32"})
    return OpenVINORunner(compiled, read_manifest(directory), "CPU", "f32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "ort-settings")
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    dirs = {}
    for name, options in {**EXPORTS, **EXPORTS_TIMED_ONCE, **OPENVINO_EXPORTS}.items():
        target = args.work / name.replace(", ", "-").replace(" ", "")
        if not (target / "export.json").is_file():
            t = time.perf_counter()
            export(target, ExportOptions(max_seq=args.context + 1, **options), preset_name=args.preset,
                   run_verify=False, force=True)
            print(f"exported {name} in {time.perf_counter() - t:.0f} s", flush=True)
        dirs[name] = target
    rng = np.random.default_rng(0)
    calls, runners = {}, []
    for export_name in EXPORTS:
        for setting, values in SETTINGS.items():
            runner = session(dirs[export_name], *values)
            runners.append(runner)
            vocab = runner.info.config.vocab_size
            _, state = runner.run(rng.integers(1, vocab, (1, args.context)), runner.initial_state(1))
            calls[(export_name, setting)] = lambda r=runner, s=state: r.run(TOKEN, s)
    for export_name in ("fp32", *OPENVINO_EXPORTS):
        for setting, fast in (("OpenVINO CPU f32", False), ("OpenVINO CPU, its int8 dynamic quantization", True)):
            if fast and export_name == "fp32":
                continue
            try:
                ov = openvino_runner(dirs[export_name], fast)
                _, state = ov.run(rng.integers(1, ov.info.config.vocab_size, (1, args.context)), ov.initial_state(1))
                calls[(export_name, setting)] = lambda r=ov, s=state: r.run(TOKEN, s)
            except Exception as e:  # not installed, or it cannot run it: said in the output
                print(f"OpenVINO on {export_name}: {e}", flush=True)
    # ONNX Runtime's other int8-compute path: its dynamic quantizer on the fp32 graph (int8 weights per channel,
    # activations quantized per call: DynamicQuantizeLinear + MatMulInteger), against our MatMulNBits 8-bit
    dynamic = args.work / "int8-dynamic.onnx"
    if not dynamic.is_file():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(dirs["fp32"] / "model.onnx", dynamic, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])
    for name, d in (("int8, int8 compute", dirs["int8, int8 compute"]), ("int8 dynamic (ORT quantize_dynamic)", None)):
        runner = session(d, *next(iter(SETTINGS.values()))) if d else dynamic_session(dynamic, dirs["fp32"])
        _, state = runner.run(rng.integers(1, runner.info.config.vocab_size, (1, args.context)), runner.initial_state(1))
        calls[(name, "ONNX Runtime CPU, bench default")] = lambda r=runner, s=state: r.run(TOKEN, s)
    timings = interleaved(calls, Budget(warmup=3, min_repeats=20, max_repeats=100_000, seconds=args.seconds))
    rows = []
    for (export_name, setting), t in timings.items():
        base = timings[(export_name if export_name in EXPORTS else "fp32", next(iter(SETTINGS)))].median_ms
        rows.append({"export": export_name, "setting": setting, "decode_ms": round(t.median_ms, 3),
                     "x_bench_default": round(t.median_ms / base, 3), "repeats": len(t.samples_ms)})
        print(f"{export_name:20} {setting:40} {t.median_ms:7.3f} ms  x{t.median_ms / base:.2f}", flush=True)
    report = {"machine": describe("cpu"), "cores": CORES, "context": args.context, "preset": args.preset, "rows": rows,
              "what": f"{args.preset} preset cummax, one-token decode after the context, ONNX Runtime CPU, interleaved medians"}
    lines = [f"{report['machine']['label']}; {args.preset} preset cummax, decode after {args.context} tokens, batch 1; "
             "medians of interleaved runs; x: against bench's default settings on the same export (OpenVINO's "
             "int8/int4 DequantizeLinear exports: against ONNX Runtime's fp32).", "",
             "| export | setting | decode ms | x default |", "|---|---|---|---|"]
    lines += [f"| {r['export']} | {r['setting']} | {r['decode_ms']:.2f} | {r['x_bench_default']:.2f} |" for r in rows]
    md = "\n".join(lines) + "\n"
    print(md)
    save_results(report, md, args.json, args.markdown)


if __name__ == "__main__":
    main()
