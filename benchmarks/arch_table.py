"""Every arch of the trained set side by side (issue 18): quality, speed and state, at fp32 and int4.

For each arch in benchmarks/trained/ (cummax, softmax, hybrid, hybrid-w64, softmax-w64, linear:
the same size, initial weights, data and steps), this exports the checkpoint at fp32 and int4
(each export verified against PyTorch), scores the held-out text with ``eval`` (windows of
the training length, and bits per byte by position in windows of --long-window), benches
decode after --contexts tokens and prefill of --prefill tokens with ``bench`` (ONNX Runtime
CPU, batch 1), and writes one table: Markdown and JSON, with each hybrid's learned alpha.

    .venv/bin/python benchmarks/arch_table.py [--set benchmarks/trained] [--work out/archs] \\
        [--text FILE] [--contexts 1024,32768] [--prefill 4096] [--archs cummax,linear] \\
        [--markdown M.md] [--json J.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from samout_edge.artifact.arch import arch_spec
from samout_edge.artifact.manifest import check_exports, read_manifest
from samout_edge.bench.machine import describe
from samout_edge.bench.report import save_results
from samout_edge.bench.suite import BenchConfig, run_bench
from samout_edge.bench.timing import Budget
from samout_edge.evaluate import eval_target
from samout_edge.exporter.onnx_export import ExportOptions, export

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("cummax", "softmax", "hybrid", "hybrid-w64", "softmax-w64", "linear")
WEIGHTS = {"fp32": dict(), "int4": dict(weights="int4")}
TRAIN_SEQ = 256  # the trained set's window


def exports(set_dir: Path, work: Path, max_seq: int,
            archs: tuple[str, ...] = ARCHS) -> dict[str, dict[str, Path]]:
    """{weights: {arch: export dir}}, exported (and verified) where not already there."""
    out: dict[str, dict[str, Path]] = {}
    for kind, extra in WEIGHTS.items():
        for arch in archs:
            target = work / f"{arch}-{kind}"
            ckpt = set_dir / arch
            try:
                m = read_manifest(target)
                fresh = m.verification and m.verification.get("passed") and m.source.get("sha256") and \
                    m.max_seq == max_seq and (m.weights.kind == "fp") == (kind == "fp32")
                from samout_edge.models.checkpoint import load_checkpoint

                fresh = fresh and load_checkpoint(ckpt).sha256 == m.source["sha256"]
            except Exception:
                fresh = False
            if not fresh:
                t = time.perf_counter()
                result = export(target, ExportOptions(arch=arch, max_seq=max_seq, logits="all", **extra),
                                checkpoint=ckpt, vocab="bytes")
                if not result.verification.passed:
                    sys.exit(f"{target}: verification failed")
                print(f"exported {arch} {kind} in {time.perf_counter() - t:.0f} s (verified)", flush=True)
            out.setdefault(kind, {})[arch] = target
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", type=Path, default=ROOT / "benchmarks" / "trained")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "archs")
    parser.add_argument("--text", type=Path, help="held-out text (default: 64 KiB written from the set's heldout.txt)")
    parser.add_argument("--contexts", default="1024,32768", help="decode after this many tokens")
    parser.add_argument("--prefill", type=int, default=4096, help="prefill this many tokens")
    parser.add_argument("--long-window", type=int, default=4096, help="eval windows for bits per byte by position")
    parser.add_argument("--max-seq", type=int, default=1024, help="the exports' max_seq (longer is fed in chunks)")
    parser.add_argument("--archs", default=",".join(ARCHS),
                        help=f"which archs, in this order (default {','.join(ARCHS)})")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    archs = tuple(args.archs.split(","))
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        parser.error(f"unknown archs {unknown}: choose from {','.join(ARCHS)}")

    args.work.mkdir(parents=True, exist_ok=True)
    text = args.text
    if text is None:
        text = args.work / "heldout.txt"
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_set.py"), "--out", str(args.set),
                        "--write-heldout", str(text), "--max-bytes", str(64 << 10)], check=True)
    contexts = [int(c) for c in args.contexts.split(",")]
    made = exports(args.set, args.work, args.max_seq, archs)
    train = json.loads((args.set / "train.json").read_text())

    rows = []
    for kind, dirs in made.items():
        pair = check_exports([dirs[a] for a in archs], list(archs))
        config = BenchConfig(modes=["prefill", "decode"], seqs=[args.prefill], contexts=contexts, backends=["ort"],
                             memory=False, budget=Budget(warmup=1, min_repeats=3, max_repeats=15, seconds=2.0))
        t = time.perf_counter()
        report = run_bench(pair, config)
        print(f"bench {kind}: {time.perf_counter() - t:.0f} s", flush=True)
        speed = {(r.arch, r.mode, r.length): r for r in report.records}
        for arch in archs:
            t = time.perf_counter()
            short = eval_target(dirs[arch], text, window=TRAIN_SEQ)
            long = eval_target(dirs[arch], text, window=args.long_window, with_reference=False) if kind == "fp32" else None
            print(f"eval {arch} {kind}: {short.bits_per_byte:.4f} bits/byte ({time.perf_counter() - t:.0f} s)", flush=True)
            m = read_manifest(dirs[arch])
            decode = {n: speed[(arch, "decode", n)] for n in contexts}
            prefill = speed[(arch, "prefill", args.prefill)]
            ms = {n: (None if r.refused else r.latency_ms["median"]) for n, r in decode.items()}
            rows.append({
                "arch": arch, "weights": kind,
                "bits_per_byte": short.bits_per_byte, "window": TRAIN_SEQ,
                "top1_agreement": short.top1_agreement,
                "by_position": long.by_position if long else None, "long_window": args.long_window,
                "decode_ms": {str(n): v for n, v in ms.items()},
                "decode_ratio_last_first": (ms[contexts[-1]] / ms[contexts[0]]) if all(ms.values()) else None,
                "state_bytes": {str(n): r.state_bytes for n, r in decode.items()},
                "prefill_ms": None if prefill.refused else prefill.latency_ms["median"], "prefill_tokens": args.prefill,
                "weights_bytes": m.weights.bytes,
                "alpha": list(m.blend.alpha) if m.blend else None,
                "trained_heldout_bits_per_byte": train["archs"][arch].get("heldout_bits_per_byte"),
            })
    result = {"machine": describe("cpu"), "set": str(args.set), "steps": train.get("steps_done"),
              "text": str(text), "text_bytes": text.stat().st_size, "contexts": contexts, "rows": rows,
              "what": "bits per byte: eval of the held-out text in windows of the training length (256); by "
                      f"position: windows of {args.long_window}; decode: median ms of one token after the context, "
                      "ONNX Runtime CPU, batch 1, the archs interleaved; prefill: one call of that many tokens "
                      "(fed in chunks of max_seq); state: bytes after the context (analytic)"}
    md = to_markdown(result)
    print(md)
    save_results(result, md, args.json, args.markdown)
    print(f"arch table of {len(archs)} archs: {time.perf_counter() - started:.0f} s", flush=True)


def fmt(v, spec: str = ".2f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def kib(n: int) -> str:
    return f"{n / 1024:,.0f} KiB" if n < 2**20 else f"{n / 2**20:,.1f} MiB"


def to_markdown(result: dict) -> str:
    c = result["contexts"]
    rows = result["rows"]
    edges = [b for b in (next((r["by_position"] for r in rows if r["by_position"]), None) or [])]
    pos_heads = [f"{b['from']}-{b['to'] - 1 if b['to'] else ''}" for b in edges]
    head = (["arch", "weights", "bits/byte", *(f"pos {h}" for h in pos_heads)]
            + [f"decode ms @{n:,}" for n in c] + [f"{c[-1] // 1024}k/{c[0] // 1024}k"]
            + [f"state @{n:,}" for n in c] + [f"prefill ms @{rows[0]['prefill_tokens']:,}", "weights MiB", "alpha"])
    lines = [f"Machine: {result['machine']['label']}; {result['steps']} training steps per arch; held-out text "
             f"{result['text_bytes']:,} bytes. {result['what']}.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        pos = [fmt(b["bits_per_byte"], ".3f") for b in r["by_position"]] if r["by_position"] else ["" for _ in edges]
        lines.append("| " + " | ".join([
            r["arch"], r["weights"], fmt(r["bits_per_byte"], ".4f"), *pos,
            *(fmt(r["decode_ms"][str(n)]) for n in c), fmt(r["decode_ratio_last_first"], ".2f") + "x",
            *(kib(r["state_bytes"][str(n)]) for n in c), fmt(r["prefill_ms"], ".0f"),
            f"{r['weights_bytes'] / 2**20:.2f}", ", ".join(f"{a:.2f}" for a in r["alpha"]) if r["alpha"] else "",
        ]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    assert all(arch_spec(a) for a in ARCHS)
    main()
