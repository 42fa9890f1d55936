"""Our int4 grid against ONNX Runtime's own quantizers, on the same fp32 export and the same text (issue 19).

For each fp32 export given (``--logits all``, a checkpoint of ours beside it), this
quantizes its model.onnx with ONNX Runtime's MatMulNBitsQuantizer (RTN symmetric and
asymmetric, HQQ, and with --calibration-text its GPTQ on the same windows ours reads;
block --block, its MatMuls only: the embedding stays float there),
exports the same checkpoint with ``export --weights int4`` (our grid: MatMuls and the
embedding; rounded to nearest, and with ``--calibration-text``, also with GPTQ on that
text: text the model was trained on, never the held-out text; each on the symmetric and
the asymmetric grid), and scores every model on the held-out text with samout-edge's eval:
bits per byte, mean KL from PyTorch fp32 and top-1 agreement over the same windows, and
the weights' bytes. One table, Markdown and JSON.

    .venv/bin/python benchmarks/quant_peers.py out/archs/cummax-fp32 out/archs/softmax-fp32 \\
        --text out/archs/heldout.txt [--calibration-text out/calibration.txt] [--block 32] [--window 256] \\
        [--markdown M.md] [--json J.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx

from samout_edge.artifact.graph import empty_state
from samout_edge.artifact.initializers import initializer_bytes
from samout_edge.artifact.manifest import MODEL_FILE, read_manifest
from samout_edge.artifact.quantization import CALIBRATION_TOKENS, CALIBRATION_WINDOW
from samout_edge.bench.machine import describe
from samout_edge.bench.report import save_results
from samout_edge.evaluate import evaluate, read_tokens
from samout_edge.exporter.onnx_export import ExportOptions, export
from samout_edge.models.checkpoint import source_checkpoint
from samout_edge.runtime.ort_runner import OrtRunner
from samout_edge.runtime.registry import load_runner
from samout_edge.runtime.torch_runner import load_torch_runner


def calibration_reader(directory: Path, text: Path, limit: int = CALIBRATION_TOKENS, window: int = CALIBRATION_WINDOW):
    """ONNX Runtime's CalibrationDataReader over the same tokens our GPTQ reads: windows of
    ``window`` of the first ``limit`` tokens, each from the empty state."""
    from onnxruntime.quantization import CalibrationDataReader

    m = read_manifest(directory)
    tokens, _ = read_tokens(text, m.config.vocab_size, None)
    tokens = np.asarray(tokens[:limit], np.int64)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"input_ids": tokens[i:i + window][None], **empty_state(m.config, m.spec, 1, m.dtype)}
                               for i in range(0, len(tokens), window)])

        def get_next(self):
            return next(self.feeds, None)

    return Reader()


def peer_models(model_path: Path, block: int, calibration: Path | None = None) -> dict[str, onnx.ModelProto]:
    """ONNX Runtime's quantizers on our fp32 graph (its MatMuls; accuracy level 1: fp32 compute),
    and its GPTQ on ``calibration`` (the text our GPTQ reads) where given."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    made = {}
    configs = [
        ("ort rtn symmetric", DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=1)),
        ("ort rtn asymmetric", DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, accuracy_level=1)),
        ("ort hqq", HQQWeightOnlyQuantConfig(block_size=block, bits=4)),
    ]
    if calibration is not None:
        configs.append(("ort gptq", GPTQWeightOnlyQuantConfig(calibration_reader(model_path.parent, calibration),
                                                              block_size=block)))
    for name, config in configs:
        quantizer = MatMulNBitsQuantizer(onnx.load(str(model_path)), algo_config=config)
        quantizer.process()
        made[name] = quantizer.model.model
    return made


def session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def score(runner, reference, tokens, token_bytes, window: int) -> dict:
    scores = evaluate(runner, tokens, token_bytes, window, window - 1, reference, reference_windows=10**9)
    return {k: scores[k] for k in ("bits_per_byte", "cost_bits_per_byte", "kl_from_fp32", "top1_agreement",
                                   "compared_tokens")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+", type=Path, help="fp32 exports with --logits all")
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--calibration-text", type=Path, help="training text for our GPTQ row")
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("out") / "quant-peers")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    rows = []
    for directory in args.exports:
        m = read_manifest(directory)
        if m.weights.quantized or m.logits != "all" or m.dtype != "fp32":
            raise SystemExit(f"{directory}: give an fp32 export with --logits all")
        from samout_edge.artifact.vocab import Vocab, export_vocab

        vocab = export_vocab(directory)
        tokens, token_bytes = read_tokens(args.text, m.config.vocab_size, vocab if isinstance(vocab, Vocab) else None)
        ckpt = source_checkpoint(directory, m, None)
        reference = load_torch_runner(ckpt, m.arch, "fp32", "all")
        models = {"fp32": onnx.load(str(directory / MODEL_FILE))}
        t = time.perf_counter()
        models.update(peer_models(directory / MODEL_FILE, args.block, args.calibration_text))
        print(f"{m.arch}: ONNX Runtime's quantizers in {time.perf_counter() - t:.0f} s", flush=True)
        ours = {}  # name -> (export, quantizer, grid)
        for quantizer in ("rtn", "gptq") if args.calibration_text else ("rtn",):
            for grid in ("symmetric", "asymmetric"):
                name = f"{quantizer}{'' if grid == 'symmetric' else ' asymmetric'}"
                ours[name] = (args.work / f"{m.arch}-int4-b{args.block}-{quantizer}-{grid}", quantizer, grid)
        for path, quantizer, grid in ours.values():
            if not path.exists():
                export(path, ExportOptions(arch=m.arch, max_seq=m.max_seq, logits="all", weights="int4",
                                           block_size=args.block, quantizer=quantizer, weights_grid=grid,
                                           calibration_text=args.calibration_text if quantizer == "gptq" else None),
                       checkpoint=ckpt.path, run_verify=False)
        for name, model in models.items():
            t = time.perf_counter()
            runner = OrtRunner(session(model), m, "CPUExecutionProvider")
            result = score(runner, reference, tokens, token_bytes, args.window)
            rows.append({"arch": m.arch, "quantizer": name, "weights_bytes": initializer_bytes(model), **result})
            print(f"{m.arch} {name}: {result['bits_per_byte']:.4f} bits/byte, KL {result['kl_from_fp32']:.5f} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
        for label, (path, _, _) in ours.items():
            with load_runner(path, "ort") as runner:
                result = score(runner, reference, tokens, token_bytes, args.window)
            name = f"samout-edge int4 {label} (block {args.block})"
            rows.append({"arch": m.arch, "quantizer": name, "weights_bytes": read_manifest(path).weights.bytes, **result})
            print(f"{m.arch} {name}: {result['bits_per_byte']:.4f} bits/byte, KL {result['kl_from_fp32']:.5f}",
                  flush=True)

    report = {"machine": describe("cpu"), "text": str(args.text), "text_bytes": args.text.stat().st_size,
              "calibration_text": str(args.calibration_text) if args.calibration_text else None,
              "calibration_bytes": args.calibration_text.stat().st_size if args.calibration_text else None,
              "block": args.block, "window": args.window, "rows": rows,
              "what": "every model scored by samout-edge eval on the same windows against PyTorch fp32 on the "
                      "export's checkpoint: bits per byte, its cost against fp32, mean KL(fp32 || model) per token, "
                      "top-1 agreement; weights: the bytes of every initializer"}
    calibrated = (f"; GPTQ calibrated on {report['calibration_bytes']:,} bytes of training text"
                  if args.calibration_text else "")
    lines = [f"Held-out text {report['text_bytes']:,} bytes, windows of {args.window}, int4 blocks of {args.block}"
             f"{calibrated}; {report['machine']['label']}.", "",
             "| arch | quantizer | weights MiB | bits/byte | cost vs fp32 | mean KL from fp32 | top-1 agreement |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['quantizer']} | {r['weights_bytes'] / 2**20:.2f} | {r['bits_per_byte']:.4f} | "
                     f"{r['cost_bits_per_byte']:+.4f} | {r['kl_from_fp32']:.5f} | {100 * r['top1_agreement']:.2f}% |")
    md = "\n".join(lines) + "\n"
    print(md)
    save_results(report, md, args.json, args.markdown)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
