"""SamOut's exports beside llama.cpp on the CPU (issue 29, part 1: the peer in our benchmarks).

A llama of the same parameter count as our preset (random weights, written with ``gguf``; F16,
Q8_0 and Q4_0 made from it by llama.cpp's own quantizer) against our ONNX exports of the preset
(``samout-edge export --preset ...``: fp32, int4, int4 with int8 activations, int8 with int8
activations; any arch), run through ONNX Runtime the way ``samout-edge bench`` runs them
(bench.suite's prefill and decode calls, ONNX Runtime with spinning off). Same machine, same
thread count, same token ids, interleaved rounds:

- prefill: one call of N tokens from the empty state (llama.cpp: the KV cache cleared, the N
  tokens fed in batches of --n-batch, logits of the last token only, as ours with --logits last);
- decode: one token after N tokens, each step feeding the next (the context is built first);
- memory: each engine in a fresh process of its own: the RSS once the model is loaded, then
  the peak RSS (VmHWM, reset through /proc/self/clear_refs) above it while a prefill of N tokens
  runs (llama.cpp: creating the context, its KV cache and compute buffers included), and
  while 4 decode steps run after it (the state or KV cache included). ONNX Runtime's arena is off
  there (bench's peak-memory setting); llama.cpp reads the GGUF into memory (no mmap), so the
  weights are in the RSS after load for both.

Each engine lives in its own worker process (ours in this interpreter, llama.cpp in the
separate venv ``.venv-peers``); the parent sends "one call" to each in turn, alternating the
order every round, and each worker times its own call, so the pipe is not in the time.

    nice -n 19 .venv/bin/python benchmarks/peers.py [--contexts 256,1024,4096] [--threads 1,2] \\
        [--archs cummax] [--forms fp32,int4,int4-a8,int8-a8] [--llama-types F32,F16,Q8_0,Q4_0] \\
        [--full] [--no-memory] [--work out/peers] [--venv .venv-peers]

The first run builds llama-cpp-python from source in ``.venv-peers`` (CMAKE_ARGS
-DGGML_NATIVE=ON: this CPU's instructions; 21 minutes on a busy 2-core Xeon) and makes
the exports and GGUFs in ``--work``; later runs reuse all three. Writes
benchmarks/results/cpu-peers.{md,json} (and .png with matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

LLAMA_CPP_VERSION = "0.3.36"
CMAKE_ARGS = "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF"  # the text model only: no multimodal library
QUANT_BLOCK = 32  # Q4_0 / Q8_0 blocks: every row llama.cpp quantizes must be a multiple of this

# Our forms: name -> the `samout-edge export` options that make it.
FORMS: dict[str, list[str]] = {
    "fp32": [],
    "int8": ["--weights", "int8"],
    "int4": ["--weights", "int4"],
    "int4-a8": ["--weights", "int4", "--activations", "int8"],
    "int8-a8": ["--weights", "int8", "--activations", "int8"],
    # the same exports run by the native backend (no ONNX Runtime in the process): cummax only
    "fp32-native": ["--native"],
    "int4-native": ["--weights", "int4", "--native"],
}
NATIVE_FORMS = {"fp32-native", "int4-native"}  # run on the native backend; every other form on ONNX Runtime
DEFAULT_FORMS = ["fp32", "int4", "int4-a8", "int8-a8"]
ALL_ARCHS = ["cummax", "hybrid-w64", "softmax-w64", "softmax"]
# llama.cpp's file types (enum llama_ftype): the GGUF we write is F32, the rest come from its quantizer.
LLAMA_TYPES: dict[str, int] = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7}
DEFAULT_LLAMA_TYPES = ["F32", "F16", "Q8_0", "Q4_0"]
# The pairs the ratio table shows: our form over llama.cpp's type (below 1: ours faster / smaller).
PAIRS = [("fp32", "F32"), ("int4", "Q4_0"), ("int4-a8", "Q4_0"), ("int8-a8", "Q8_0"), ("int8", "Q8_0"),
         ("fp32-native", "F32"), ("int4-native", "Q4_0")]
MEMORY_STEPS = 4  # decode steps the memory child measures (bench's MemorySpec.steps)


# --------------------------------------------------------------------------- the llama of the same size


@dataclass(frozen=True)
class LlamaShape:
    vocab: int
    hidden: int
    heads: int
    layers: int
    n_ff: int
    tied: bool = False  # our head is its own matrix, so the llama's output.weight is too

    def parameter_count(self) -> int:
        """llama's weights: embedding, per layer q/k/v/o, gate/up/down and two RMSNorms, the final
        norm and the output matrix (llama.cpp's llama_model_n_params counts the same)."""
        h = self.hidden
        per_layer = 4 * h * h + 3 * h * self.n_ff + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * per_layer + h

    def to_dict(self) -> dict:
        return {**asdict(self), "parameters": self.parameter_count()}


def llama_shape(vocab: int, hidden: int, heads: int, layers: int, parameters: int,
                multiple: int = QUANT_BLOCK) -> LlamaShape:
    """The llama with our width, depth, heads and vocabulary whose feed-forward width n_ff brings
    its parameter count closest to ``parameters``, n_ff a multiple of ``multiple`` (ffn_down's rows
    are n_ff long, and Q4_0/Q8_0 quantize rows in blocks of 32)."""
    fixed = LlamaShape(vocab, hidden, heads, layers, 0).parameter_count()
    exact = (parameters - fixed) / (3 * hidden * layers)
    if exact <= 0:
        raise ValueError(f"{parameters:,} parameters leave no room for a feed-forward ({fixed:,} without one)")
    low = max(multiple, math.floor(exact / multiple) * multiple)
    best = min((low, low + multiple), key=lambda n: (abs(LlamaShape(vocab, hidden, heads, layers, n)
                                                         .parameter_count() - parameters), n))
    return LlamaShape(vocab, hidden, heads, layers, best)


def shape_for_preset(name: str) -> tuple[LlamaShape, int]:
    """(the llama, our parameter count) for one of our presets."""
    from samout_edge.artifact.config import preset

    c = preset(name)
    ours = c.parameter_count()
    return llama_shape(c.vocab_size, c.hidden_size, c.num_heads, c.num_layers, ours), ours


# --------------------------------------------------------------------------- engines and results


@dataclass(frozen=True)
class Engine:
    family: str  # ours | llama.cpp
    arch: str  # ours: the arch; llama.cpp: llama
    form: str  # ours: FORMS key; llama.cpp: LLAMA_TYPES key
    path: str = ""  # the export directory or the GGUF
    flash_attn: str = "auto"  # llama.cpp: its flash-attention setting (auto: llama.cpp's default)

    @property
    def key(self) -> str:
        if self.family == "ours":
            return f"{self.arch} {self.form}"
        return f"llama.cpp {self.form}" + ("" if self.flash_attn == "auto" else f" FA {self.flash_attn}")


def interleaved_order(names: list[str], round_index: int) -> list[str]:
    """bench's order (bench/timing.py): A B ... then ... B A, alternating every round."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def summary(samples_ms: list[float]) -> dict:
    """median and p90 as bench's Timing computes them (numpy's percentile, linear)."""
    if not samples_ms:
        return {"median": None, "p90": None, "n": 0}
    s = sorted(samples_ms)
    rank = 0.9 * (len(s) - 1)
    lo = math.floor(rank)
    p90 = s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (rank - lo)
    return {"median": statistics.median(s), "p90": p90, "n": len(s)}


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs <= 0:
        return None
    return ours / theirs


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}" if v >= 10 else f"{v:.2f}"


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def fmt_mb(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _index(report: dict) -> tuple[dict, dict]:
    times = {(r["engine"], r["threads"], r["mode"], r["length"]): r for r in report["timings"]}
    memory = {(m["engine"], m["length"]): m for m in report.get("memory", [])}
    return times, memory


def ratio_rows(report: dict) -> list[dict]:
    """One row per (threads, context, arch, our form vs llama.cpp type) where both ran: the
    medians and ours / llama.cpp for decode and prefill, and the prefill peak above the model."""
    times, memory = _index(report)
    engines = {e["key"]: e for e in report["engines"]}
    rows = []
    for threads in report["config"]["threads"]:
        for length in report["config"]["contexts"]:
            for arch in report["config"]["archs"]:
                for form, ltype in PAIRS:
                    ours = f"{arch} {form}"
                    peers = [k for k, e in engines.items() if e["family"] == "llama.cpp" and e["form"] == ltype]
                    for theirs in (peers if ours in engines else []):
                        rows.append(_ratio_row(times, memory, threads, length, ours, theirs))
    return rows


def _ratio_row(times: dict, memory: dict, threads: int, length: int, ours: str, theirs: str) -> dict:
    row = {"threads": threads, "context": length, "ours": ours, "llama": theirs}
    for mode in ("decode", "prefill"):
        a = times.get((ours, threads, mode, length), {}).get("median_ms")
        b = times.get((theirs, threads, mode, length), {}).get("median_ms")
        row[mode] = {"ours_ms": a, "llama_ms": b, "ratio": ratio(a, b)}
    ma, mb = memory.get((ours, length), {}), memory.get((theirs, length), {})
    row["prefill_peak_mb"] = {"ours": ma.get("prefill_peak_mb"), "llama": mb.get("prefill_peak_mb"),
                              "ratio": ratio(ma.get("prefill_peak_mb"), mb.get("prefill_peak_mb"))}
    return row


HEADLINE_MEMORY = (("prefill_peak_mb", "prefill peak MB above the model"), ("peak_rss_mb", "process peak RSS MB"))


def _cell(ours: float | None, theirs: float | None, fmt) -> str:
    if ours is None or theirs is None:
        return "-"
    return f"{fmt(ours)} / {fmt(theirs)} ({fmt_ratio(ratio(ours, theirs))})"


def headline(report: dict) -> list[str]:
    """Each of our forms against its llama.cpp type, each cell against llama.cpp's better
    setting for that cell (flash attention on or off, whichever is faster or smaller there):
    the table the README leads with."""
    times, memory = _index(report)
    cfg, engines = report["config"], report["engines"]
    keys = {e["key"] for e in engines}
    contexts = cfg["contexts"]
    lines = ["| threads | ours / llama.cpp (its better setting) | " + " | ".join(f"{n:,} tokens" for n in contexts)
             + " |", "|---:|---|" + "---:|" * len(contexts)]
    for threads in cfg["threads"]:
        for arch in cfg["archs"]:
            for form, ltype in PAIRS:
                ours = f"{arch} {form}"
                theirs = [e["key"] for e in engines if e["family"] == "llama.cpp" and e["form"] == ltype]
                if ours not in keys or not theirs:
                    continue
                rows = [(what, fmt_ms, lambda key, n, m=mode, t=threads: times.get((key, t, m, n), {}).get("median_ms"))
                        for mode, what in (("decode", "decode ms/token"), ("prefill", "prefill ms"))]
                if threads == cfg.get("memory_threads"):
                    rows += [(what, fmt_mb, lambda key, n, f=name: memory.get((key, n), {}).get(f))
                             for name, what in HEADLINE_MEMORY if memory]
                for what, fmt, value in rows:
                    cells = [_cell(value(ours, n), min((v for k in theirs if (v := value(k, n)) is not None),
                                                       default=None), fmt) for n in contexts]
                    lines.append(f"| {threads} | {what}, {ours} / {ltype} | " + " | ".join(cells) + " |")
    return lines


def _grid(report: dict, mode: str) -> list[str]:
    threads, contexts = report["config"]["threads"], report["config"]["contexts"]
    times, _ = _index(report)
    cols = [(t, n) for t in threads for n in contexts]
    head = "| engine | " + " | ".join(f"{n:,} tok, {t} thr" for t, n in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for e in report["engines"]:
        cells = []
        for t, n in cols:
            r = times.get((e["key"], t, mode, n))
            if r is None or r.get("median_ms") is None:
                cells.append(r.get("error", "-") if r else "-")
            else:
                cells.append(f"{fmt_ms(r['median_ms'])} ({fmt_ms(r['p90_ms'])})")
        lines.append(f"| {e['key']} | " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict) -> str:
    m, cfg = report["machine"], report["config"]
    shape, ours_params = report["llama_shape"], report["ours_parameters"]
    out = [
        "# SamOut's exports beside llama.cpp on the CPU",
        "",
        "Written by `benchmarks/peers.py` (issue 29). "
        f"Machine: {m['label']}, {m.get('memory_gib')} GiB" + (f"; {m['flags_note']}" if m.get("flags_note") else "") + ". "
        f"ONNX Runtime {m.get('onnxruntime')}, llama-cpp-python {m.get('llama_cpp_python')} "
        f"(built here from source, {m.get('llama_cmake_args')}).",
        "",
        (f"**{m['sharing']}** " if m.get("sharing") else "") +
        f"Load average at start / end: {m.get('load_start')} / {m.get('load_end')}. "
        "Compare ratios, not absolute times.",
        "",
        f"Models: our `{cfg['preset']}` preset ({ours_params:,} parameters, random weights, "
        f"`samout-edge export --preset {cfg['preset']}`, max_seq {cfg['max_seq']}) and a llama of "
        f"hidden {shape['hidden']}, {shape['heads']} heads ({shape['heads']} KV heads), {shape['layers']} layers, "
        f"vocab {shape['vocab']}, n_ff {shape['n_ff']} ({shape['parameters']:,} parameters, "
        f"{(shape['parameters'] / ours_params - 1) * 100:+.2f}%; random weights written with `gguf`, "
        "F16/Q8_0/Q4_0 by llama.cpp's `llama_model_quantize` with its default choices).",
        "",
        f"Settings: threads {', '.join(map(str, cfg['threads']))}, the same for both engines "
        f"(ONNX Runtime intra-op threads, spinning off as in `bench`; llama.cpp n_threads = n_threads_batch, "
        f"OMP_WAIT_POLICY=passive, n_batch {cfg['n_batch']}, n_ubatch {cfg['n_ubatch']}, "
        f"flash attention {' and '.join(cfg['flash_attn'])} (an engine each; auto is llama.cpp's default, "
        "on here: `FA off` rows have it off), KV cache f16, "
        + ("AMX allowed" if cfg.get("llama_amx") else "AMX refused: its AMX kernels crash on this VM, so ggml takes "
           "its path for x86 CPUs without AMX, Q4_0 repacked at load") + "); no pinning. Same token ids "
        f"(bench's: `default_rng(N)`). Interleaved rounds (every engine once per round, the order "
        f"reversed each round); prefill up to {cfg['prefill_rounds']} rounds, decode up to "
        f"{cfg['decode_steps']} steps, after {cfg['warmup']} warm-up calls, each series stopped "
        f"after {cfg['seconds']} s per engine once it has {cfg['min_rounds']} samples.",
        "",
        f"Command: `{report['command']}` ({report['elapsed_s']:.0f} s).",
        "",
        "## Headline: ours / llama.cpp's better setting in each cell (medians; below 1.00x: ours faster or smaller)",
        "",
        *headline(report),
        "",
        "## Ours over each llama.cpp setting (median; below 1.00x: ours faster or smaller)",
        "",
        "| threads | context | ours | llama.cpp | decode ms/token, ours vs llama | decode ratio "
        "| prefill ms, ours vs llama | prefill ratio | prefill peak MB above the model | memory ratio |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ratio_rows(report):
        d, p, mem = r["decode"], r["prefill"], r["prefill_peak_mb"]
        out.append(
            f"| {r['threads']} | {r['context']:,} | {r['ours']} | {r['llama']} "
            f"| {fmt_ms(d['ours_ms'])} vs {fmt_ms(d['llama_ms'])} | {fmt_ratio(d['ratio'])} "
            f"| {fmt_ms(p['ours_ms'])} vs {fmt_ms(p['llama_ms'])} | {fmt_ratio(p['ratio'])} "
            f"| {fmt_mb(mem['ours'])} / {fmt_mb(mem['llama'])} | {fmt_ratio(mem['ratio'])} |")
    out += ["", "## Decode: ms per token after N tokens, median (p90)", ""] + _grid(report, "decode")
    out += ["", "## Prefill: ms for N tokens from the empty state, median (p90)", ""] + _grid(report, "prefill")
    if report.get("memory"):
        _, memory = _index(report)
        lengths = cfg["contexts"]
        out += ["", f"## Memory ({cfg['memory_threads']} thread{'s' if cfg['memory_threads'] > 1 else ''}, "
                "a fresh process per engine and context): MB", "",
                "Ours as generate and serve run an export (ONNX Runtime's arena on). RSS after load: the process once the model is loaded (the interpreter, the runtime and "
                "the weights). Peaks: VmHWM above that while the prefill of N tokens runs, and while "
                f"{MEMORY_STEPS} decode steps run after it.", "",
                "| engine | weights MB | RSS after load | " + " | ".join(
                    f"prefill peak {n:,} | decode peak {n:,}" for n in lengths) + " |",
                "|---|---:|---:|" + "---:|---:|" * len(lengths)]
        for e in report["engines"]:
            rows = [memory.get((e["key"], n), {}) for n in lengths]
            load = next((r.get("rss_load_mb") for r in rows if r.get("rss_load_mb") is not None), None)
            cells = []
            for r in rows:
                if r.get("error"):
                    cells += [r["error"], "-"]
                else:
                    cells += [fmt_mb(r.get("prefill_peak_mb")), fmt_mb(r.get("decode_peak_mb"))]
            out.append(f"| {e['key']} | {fmt_mb(e.get('weights_mb'))} | {fmt_mb(load)} | " + " | ".join(cells) + " |")
        out += ["", "The whole process at its peak (load, the prefill of N tokens, the decode steps after it: "
                "what the machine must have free), MB:", "",
                "| engine | " + " | ".join(f"{n:,} tokens" for n in lengths) + " |",
                "|---|" + "---:|" * len(lengths)]
        for e in report["engines"]:
            peaks = [memory.get((e["key"], n), {}).get("peak_rss_mb") for n in lengths]
            out.append(f"| {e['key']} | " + " | ".join(fmt_mb(v) for v in peaks) + " |")
    ours = [e for e in report["engines"] if e["family"] == "ours"]
    if ours:
        out += ["", "## Our exports", "", "| engine | export options | weights MB | checked against PyTorch |",
                "|---|---|---:|---|"]
        for e in ours:
            opts = " ".join(FORMS.get(e["form"], [])) or "(fp32)"
            out.append(f"| {e['key']} | `--arch {e['arch']} {opts}` | {fmt_mb(e.get('weights_mb'))} "
                       f"| {e.get('check') or '-'} |")
    if report.get("gguf_types"):
        out += ["", "## llama.cpp's files", "",
                "| type | file MB | tensor types (count) | loaded into (MiB) | repacked (tensors) |",
                "|---|---:|---|---|---|"]
        for name, info in report["gguf_types"].items():
            types = ", ".join(f"{t} {c}" for t, c in sorted(info["tensor_types"].items()))
            into = ", ".join(f"{b} {v:,.1f}" for b, v in info.get("model_buffers_mib", {}).items()) or "-"
            repacked = ", ".join(f"{k} {v}" for k, v in info.get("repacked", {}).items()) or "-"
            out.append(f"| {name} | {fmt_mb(info['bytes'] / 2**20)} | {types} | {into} | {repacked} |")
    if report.get("notes"):
        out += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(out) + "\n"


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    times, _ = _index(report)
    threads = report["config"]["threads"]
    fig, axes = plt.subplots(2, len(threads), figsize=(6 * len(threads), 8), squeeze=False)
    for j, t in enumerate(threads):
        for i, mode in enumerate(("decode", "prefill")):
            ax = axes[i][j]
            for k, e in enumerate(report["engines"]):
                pts = [(n, times[(e["key"], t, mode, n)]["median_ms"]) for n in report["config"]["contexts"]
                       if times.get((e["key"], t, mode, n), {}).get("median_ms") is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", linestyle="--" if e["family"] == "llama.cpp" else "-",
                            color=plt.cm.tab20(k % 20), label=e["key"])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("ms per token" if mode == "decode" else "ms for the prefill")
            ax.set_title(f"{mode}, {t} thread{'s' if t > 1 else ''}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"SamOut exports (ONNX Runtime) vs llama.cpp, {report['machine']['label']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- the worker (a process per engine)
# The llama.cpp worker runs in .venv-peers, where samout_edge is not installed: the RSS helpers
# below mirror bench/peak_memory.py's instead of importing them.


def _status_kib(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise OSError(f"{name} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM back to the current RSS (Linux >= 4.0)


def _trim() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def token_ids(length: int, steps: int, vocab: int):
    """bench's ids for a point (suite._measure_point): the same for every engine."""
    import numpy as np

    return np.random.default_rng(length).integers(1, vocab, (1, length + steps))


class OursEngine:
    """An export through ONNX Runtime (or the native backend), with bench's calls (bench/suite.py)."""

    def __init__(self, path: str, threads: int, backend: str = "ort"):
        from samout_edge.runtime.registry import backend_named, load_runner

        if backend == "native":
            options = backend_named("native").options(intra_op_threads=threads)
        else:  # ONNX Runtime's arena on, as generate and serve run an export: memory is what a user's process holds
            options = backend_named("ort").options(provider="cpu", spinning=False, intra_op_threads=threads)
        self.runner = load_runner(path, backend, options)
        self.vocab = self.runner.info.config.vocab_size

    def prefill(self, ids, length: int):
        from samout_edge.bench.suite import _prefill_call

        return _prefill_call(self.runner, ids[:, :length], self.runner.initial_state(1))

    def decode(self, ids, length: int):
        from samout_edge.bench.suite import _decode_call

        _, state = self.runner.run(ids[:, :length], self.runner.initial_state(1))  # run() chunks past max_seq
        return _decode_call(self.runner, ids, length, state)


class LlamaEngine:
    """A GGUF through llama.cpp's C API (llama-cpp-python's low-level bindings): one context per
    point, sized for the point's tokens, batches built before the clock starts."""

    def __init__(self, path: str, threads: int, n_batch: int, n_ubatch: int, flash_attn: str):
        import llama_cpp as L

        self.L, self.threads, self.n_batch, self.n_ubatch = L, threads, n_batch, n_ubatch
        self.flash = {"auto": -1, "off": 0, "on": 1}[flash_attn]
        L.llama_backend_init()
        params = L.llama_model_default_params()
        params.n_gpu_layers = 0
        if hasattr(params, "load_mode"):
            params.load_mode = L.LLAMA_LOAD_MODE_NONE  # read into memory: the weights are in the RSS after load
        else:
            params.use_mmap = False
        self.model = L.llama_model_load_from_file(path.encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {path}")
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.ctx = None
        self.batches: list = []

    def _context(self, n_ctx: int) -> None:
        L = self.L
        self.close_context()
        p = L.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = n_ctx, self.n_batch, self.n_ubatch
        p.n_threads = p.n_threads_batch = self.threads
        p.flash_attn_type = self.flash
        p.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, p)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp cannot make a context of {n_ctx} tokens")
        self.memory = L.llama_get_memory(self.ctx)
        self.one = L.llama_batch_init(1, 0, 1)
        self.one.n_tokens = 1
        self.one.n_seq_id[0], self.one.seq_id[0][0], self.one.logits[0] = 1, 0, 1

    def close_context(self) -> None:
        L = self.L
        for b in self.batches:
            L.llama_batch_free(b)
        self.batches = []
        if self.ctx:
            L.llama_batch_free(self.one)
            L.llama_free(self.ctx)
            self.ctx = None

    def _batches(self, ids, length: int) -> list:
        L = self.L
        out = []
        for start in range(0, length, self.n_batch):
            n = min(self.n_batch, length - start)
            b = L.llama_batch_init(n, 0, 1)
            b.n_tokens = n
            for i in range(n):
                b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = int(ids[0, start + i]), start + i, 1, 0
                b.logits[i] = 1 if start + i == length - 1 else 0
            out.append(b)
        self.batches += out
        return out

    def _feed(self, batches) -> None:
        for b in batches:
            rc = self.L.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
        self.L.llama_get_logits_ith(self.ctx, -1)

    def prefill(self, ids, length: int, n_ctx: int | None = None):
        self._context(n_ctx or ids.shape[1])  # a fresh context sized for this point
        batches = self._batches(ids, length)
        L, memory = self.L, self.memory

        def call() -> None:
            L.llama_memory_clear(memory, True)
            self._feed(batches)

        return call

    def decode(self, ids, length: int, n_ctx: int | None = None):
        self._context(n_ctx or ids.shape[1])
        self._feed(self._batches(ids, length))  # the context, not timed
        L, ctx, one, box = self.L, self.ctx, self.one, {"pos": length}

        def step() -> None:
            pos = box["pos"]
            one.token[0], one.pos[0] = int(ids[0, pos]), pos
            rc = L.llama_decode(ctx, one)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            L.llama_get_logits_ith(ctx, -1)
            box["pos"] = pos + 1

        return step


def forbid_amx() -> None:
    """Make this process's request for AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM) fail, with a
    seccomp filter, before llama.cpp asks: ggml then leaves out its AMX buffer type and takes the
    path of every x86 CPU without AMX (Q4_0 repacked to q4_0_8x8 in its CPU_REPACK buffer, int8
    dot products with AVX-512 VNNI / AVX2). Its AMX kernels die with SIGSEGV at ldtilecfg on this
    VM's Sapphire Rapids (a plain C ldtilecfg/tilezero works here), so Q4_0 and Q8_0 could not run."""
    import ctypes

    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

    ld_abs, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K
    insns = (Insn * 6)(
        Insn(ld_abs, 0, 0, 0),  # seccomp_data.nr
        Insn(jeq, 0, 3, 158),  # arch_prctl (x86-64), else allow
        Insn(ld_abs, 0, 0, 16),  # args[0], low 32 bits
        Insn(jeq, 0, 1, 0x1023),  # ARCH_REQ_XCOMP_PERM, else allow
        Insn(ret, 0, 0, 0x00050000 | 1),  # SECCOMP_RET_ERRNO | EPERM
        Insn(ret, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
    )
    prog = Prog(len(insns), insns)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(38, 1, None, 0, 0) or libc.prctl(22, 2, ctypes.cast(ctypes.pointer(prog), ctypes.c_void_p), 0, 0):
        raise OSError(ctypes.get_errno(), "cannot install the seccomp filter that keeps llama.cpp off AMX")


def _load(spec: dict):
    if spec["family"] != "ours" and not spec.get("amx", False) and "llama_cpp" not in sys.modules:
        forbid_amx()  # PR_SET_NO_NEW_PRIVS + PR_SET_SECCOMP
    if spec["family"] == "ours":
        return OursEngine(spec["path"], spec["threads"], spec.get("backend", "ort"))
    return LlamaEngine(spec["path"], spec["threads"], spec["n_batch"], spec["n_ubatch"], spec["flash_attn"])


def measure_memory(spec: dict) -> dict:
    """In a fresh process: the RSS after load, then the peak above it during a prefill of
    ``length`` tokens and during MEMORY_STEPS decode steps after it."""
    length = spec["length"]
    engine = _load(spec)
    ids = token_ids(length, MEMORY_STEPS, engine.vocab)  # before the base: numpy.random is 7 MB of RSS
    _trim()
    base = _status_kib("VmRSS") * 1024
    _reset_peak()
    if spec["family"] == "ours":
        r = engine.runner  # run() chunks past max_seq, as bench's calls do
        _, state = r.run(ids[:, :length], r.initial_state(1))
        prefill = _status_kib("VmHWM") * 1024
        _trim()
        _reset_peak()
        for k in range(MEMORY_STEPS):
            _, state = r.run(ids[:, length + k: length + k + 1], state)
    else:
        engine.prefill(ids, length, n_ctx=length + MEMORY_STEPS)()  # the context's creation included
        prefill = _status_kib("VmHWM") * 1024
        _trim()
        _reset_peak()
        box = {"pos": length}
        L, one = engine.L, engine.one
        for _ in range(MEMORY_STEPS):
            one.token[0], one.pos[0] = int(ids[0, box["pos"]]), box["pos"]
            if L.llama_decode(engine.ctx, one) != 0:
                raise RuntimeError("llama_decode failed")
            box["pos"] += 1
    decode = _status_kib("VmHWM") * 1024
    return {"rss_load_mb": base / 2**20, "prefill_peak_mb": max(0, prefill - base) / 2**20,
            "decode_peak_mb": max(0, decode - base) / 2**20, "peak_rss_mb": max(prefill, decode) / 2**20}


def worker_main() -> None:
    """The protocol: one JSON object a line in, one out. stdout is kept for it alone (the
    libraries' prints go to stderr)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    engine, call = None, None
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg["op"]
        try:
            if op == "load":
                t0 = time.perf_counter()
                engine = _load(msg["spec"])
                reply = {"ok": True, "load_s": time.perf_counter() - t0, "rss_mb": _status_kib("VmRSS") / 1024,
                         "vocab": engine.vocab}
                if msg["spec"]["family"] != "ours":
                    reply["system_info"] = engine.L.llama_print_system_info().decode()
            elif op == "setup":
                call = None
                ids = token_ids(msg["length"], msg["steps"], engine.vocab)
                call = getattr(engine, msg["mode"])(ids, msg["length"])
                reply = {"ok": True}
            elif op == "call":
                t0 = time.perf_counter()
                call()
                reply = {"ok": True, "ms": (time.perf_counter() - t0) * 1e3}
            elif op == "memory":
                reply = {"ok": True, **measure_memory(msg["spec"])}
            elif op == "quit":
                proto.write(json.dumps({"ok": True}) + "\n")
                return
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
        except Exception as e:  # reported to the parent, which records the cell as failed
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(reply) + "\n")


class Worker:
    def __init__(self, python: str, env: dict, log: Path):
        self.start = log.stat().st_size if log.exists() else 0
        self.log = open(log, "a")
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, bufsize=1)

    def ask(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited (rc {self.proc.wait()}); see {self.log.name}")
        return json.loads(line)

    def log_text(self) -> str:
        """What the worker wrote to its log since it started (llama.cpp's load report)."""
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            f.seek(self.start)
            return f.read()

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.ask(op="quit")
            self.proc.wait(timeout=30)
        except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError):
            self.proc.kill()  # our own child
            self.proc.wait()
        self.log.close()


# --------------------------------------------------------------------------- preparing: venv, exports, GGUFs


def peers_python(venv: Path) -> str:
    return str(venv / "bin" / "python")


def venv_ready(venv: Path) -> str | None:
    """The llama-cpp-python version in the venv, or None if it is not usable."""
    py = venv / "bin" / "python"
    if not py.exists():
        return None
    r = subprocess.run([str(py), "-c", "import llama_cpp, gguf, numpy; print(llama_cpp.__version__)"],
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def ensure_venv(venv: Path, version: str, log: Path) -> str:
    found = venv_ready(venv)
    if found:
        return found
    print(f"building llama-cpp-python {version} from source in {venv} (CMAKE_ARGS={CMAKE_ARGS}); log: {log}",
          flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        run = lambda *cmd, env=None: subprocess.run(list(cmd), stdout=f, stderr=subprocess.STDOUT, check=True,  # noqa: E731
                                                    env=env)
        if not (venv / "bin" / "python").exists():
            run(sys.executable, "-m", "venv", str(venv))
        py = peers_python(venv)
        run(py, "-m", "pip", "install", "-q", "numpy", "gguf")
        env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
        run(py, "-m", "pip", "install", "-v", "--no-binary", "llama-cpp-python", "--no-cache-dir",
            f"llama-cpp-python=={version}", env=env)
    print(f"built in {time.time() - t0:.0f} s", flush=True)
    found = venv_ready(venv)
    if not found:
        raise SystemExit(f"llama-cpp-python did not import after the build; see {log}")
    return found


def write_gguf(path: Path, shape: LlamaShape, seed: int = 0, weights: dict | None = None,
               name: str = "samout-peers random llama") -> None:
    """A llama GGUF in F32 with random weights (N(0, 0.02), norms 1), or ``weights`` (GGUF
    tensor name -> numpy array, [out, in]: benchmarks/llama_alike.py's trained llama), and a
    placeholder SPM vocabulary of ``shape.vocab`` tokens (<unk> <s> </s>, the 256 byte tokens,
    then filler): llama.cpp needs a vocabulary to load; the benchmarks feed token ids, never text."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    weights = dict(weights or {})

    def tensor(key: str, make):
        if not weights:
            return make()
        value = np.ascontiguousarray(weights.pop(key), np.float32)
        if value.shape != make().shape:
            raise ValueError(f"{key}: {value.shape}, the shape wants {make().shape}")
        return value

    h, ff = shape.hidden, shape.n_ff
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(32768)
    w.add_embedding_length(h)
    w.add_block_count(shape.layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.heads)
    w.add_rope_dimension_count(h // shape.heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)  # ALL_F32
    w.add_vocab_size(shape.vocab)
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    tokens += [f"t{i}".encode() for i in range(len(tokens), shape.vocab)]
    types = [2, 3, 3] + [6] * 256 + [1] * (shape.vocab - 259)  # UNKNOWN, CONTROL, BYTE, NORMAL
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens[: shape.vocab])
    w.add_token_scores([0.0] * shape.vocab)
    w.add_token_types(types[: shape.vocab])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)

    def t(key: str, *dims: int) -> None:  # numpy [out, in]: GGUF's ne (in, out), as llama.cpp reads it
        w.add_tensor(key, tensor(key, lambda: (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float32)))

    def ones(key: str) -> None:
        w.add_tensor(key, tensor(key, lambda: np.ones(h, np.float32)))

    t("token_embd.weight", shape.vocab, h)
    for i in range(shape.layers):
        ones(f"blk.{i}.attn_norm.weight")
        for q in ("q", "k", "v", "output"):
            t(f"blk.{i}.attn_{q}.weight", h, h)
        ones(f"blk.{i}.ffn_norm.weight")
        t(f"blk.{i}.ffn_gate.weight", ff, h)
        t(f"blk.{i}.ffn_up.weight", ff, h)
        t(f"blk.{i}.ffn_down.weight", h, ff)
    ones("output_norm.weight")
    t("output.weight", shape.vocab, h)
    if weights:
        raise ValueError(f"tensors a llama does not have: {', '.join(sorted(weights))}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_gguf(src: Path, dst: Path, ftype: int, threads: int) -> None:
    """llama.cpp's own quantizer, with its default choices (as `llama-quantize` makes them)."""
    import llama_cpp as L

    L.llama_backend_init()
    params = L.llama_model_quantize_default_params()
    params.nthread, params.ftype = threads, ftype
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {dst} (ftype {ftype}) returned {rc}")


def gguf_types(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return {"bytes": path.stat().st_size, "tensor_types": counts}


def make_ggufs_main(argv: list[str]) -> None:
    """Run in the peers venv: the F32 GGUF and the quantized ones, then their tensor types (JSON)."""
    spec = json.loads(argv[0])
    work = Path(spec["work"])
    shape = LlamaShape(**spec["shape"])
    f32 = work / f"llama-{shape.n_ff}-F32.gguf"
    if not f32.exists():
        write_gguf(f32.with_suffix(".tmp"), shape)
        f32.with_suffix(".tmp").rename(f32)
    out = {}
    for name in spec["types"]:
        path = work / f"llama-{shape.n_ff}-{name}.gguf"
        if not path.exists():
            quantize_gguf(f32, path.with_suffix(".tmp"), LLAMA_TYPES[name], spec["threads"])
            path.with_suffix(".tmp").rename(path)
        out[name] = {"path": str(path), **gguf_types(path)}
    print(json.dumps(out))


def make_export(directory: Path, preset: str, arch: str, form: str, max_seq: int, verify: bool, env: dict,
                log: Path) -> str:
    """Our export of (preset, arch, form), made once: returns how it was checked, "verified",
    "not verified" (--no-verify) or "verification failed: ..." (export's own check against PyTorch
    failed; the files stay, so the timing can still be taken, and the report says so). Kept
    beside the export as <dir>.status, since export.json is there either way."""
    status_file = directory.with_name(directory.name + ".status")
    if (directory / "export.json").exists() and status_file.exists():
        return status_file.read_text().strip()
    cmd = [sys.executable, "-m", "samout_edge", "export", "--preset", preset, "--arch", arch, "--max-seq",
           str(max_seq), "-o", str(directory), "--force", *FORMS[form]] + ([] if verify else ["--no-verify"])
    print(f"  exporting {arch} {form}: {' '.join(cmd[2:])}", flush=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        start = f.tell()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    text = log.read_bytes()[start:].decode(errors="replace")  # tell() counts bytes; the tables have 3-byte characters
    if rc == 0:
        status = "verified" if verify else "not verified"
    elif "verification FAILED" in text and (directory / "export.json").exists():
        failed = sorted({line.split("│")[2].strip() for line in text.splitlines()
                         if line.count("│") >= 5 and "FAIL" in line.split("│")[-2]})
        status = "verification failed: " + ", ".join(failed)
        print(f"  {arch} {form}: {status} (timed anyway)", flush=True)
    else:
        raise SystemExit(f"exporting {arch} {form} failed (exit {rc}); see {log}")
    status_file.write_text(status + "\n")
    return status


# --------------------------------------------------------------------------- the run


@dataclass
class Plan:
    preset: str = "seed"
    contexts: list[int] = field(default_factory=lambda: [256, 1024, 4096])
    threads: list[int] = field(default_factory=lambda: [1, 2])
    archs: list[str] = field(default_factory=lambda: ["cummax"])
    forms: list[str] = field(default_factory=lambda: list(DEFAULT_FORMS))
    llama_types: list[str] = field(default_factory=lambda: list(DEFAULT_LLAMA_TYPES))
    modes: list[str] = field(default_factory=lambda: ["prefill", "decode"])
    warmup: int = 2
    prefill_rounds: int = 7
    decode_steps: int = 40
    min_rounds: int = 3
    seconds: float = 4.0
    n_batch: int = 512
    n_ubatch: int = 512
    flash_attn: list[str] = field(default_factory=lambda: ["auto", "off"])  # a llama.cpp engine per setting
    llama_amx: bool = False  # let llama.cpp use AMX (forbid_amx: its kernels crash on this VM)
    memory: bool = True
    memory_threads: int = 1
    max_seq: int = 0  # 0: bench's rule (the longest call, up to 4096)
    verify: bool = True


def series(workers: dict[str, Worker], mode: str, plan: Plan) -> dict[str, dict]:
    """One point: every engine's calls, interleaved. Returns engine -> samples or error."""
    names = [k for k in workers]
    rounds = plan.prefill_rounds if mode == "prefill" else plan.decode_steps
    samples: dict[str, list[float]] = {k: [] for k in names}
    errors: dict[str, str] = {}
    for _ in range(plan.warmup):
        for k in names:
            if k not in errors:
                r = workers[k].ask(op="call")
                if not r["ok"]:
                    errors[k] = r["error"]
    spent: dict[str, float] = {k: 0.0 for k in names}
    for i in range(rounds):
        for k in interleaved_order(names, i):
            if k in errors:
                continue
            r = workers[k].ask(op="call")
            if not r["ok"]:
                errors[k] = r["error"]
                continue
            samples[k].append(r["ms"])
            spent[k] += r["ms"] / 1e3
        if i + 1 >= plan.min_rounds and all(spent[k] >= plan.seconds for k in names if k not in errors):
            break
    return {k: ({"error": errors[k]} if k in errors else {"samples": samples[k]}) for k in names}


def tree_env() -> dict:
    """This tree's samout_edge first on the path, for the export commands and the workers."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def export_max_seq(plan: Plan) -> int:
    """bench's rule (BenchConfig.export_max_seq): the longest call, up to EXPORT_MAX_SEQ."""
    from samout_edge.bench.suite import EXPORT_MAX_SEQ

    return plan.max_seq or min(max(plan.contexts) + plan.warmup + plan.decode_steps + 1, EXPORT_MAX_SEQ)


def prepare_exports(plan: Plan, work: Path) -> tuple[list[Engine], dict[str, float], dict[str, str]]:
    """Our exports (made once, reused by later runs): (engines, weights MB, how each was checked)."""
    max_seq = export_max_seq(plan)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    engines, weights_mb, checks = [], {}, {}
    for arch in plan.archs:
        for form in plan.forms:
            directory = work / "exports" / f"{plan.preset}-{arch}-{form}-s{max_seq}"
            status = make_export(directory, plan.preset, arch, form, max_seq, plan.verify, tree_env(),
                                 work / "logs" / "exports.log")
            e = Engine("ours", arch, form, str(directory))
            engines.append(e)
            checks[e.key] = status
            wb = (json.loads((directory / "export.json").read_text()).get("weights") or {}).get("bytes")
            weights_mb[e.key] = wb / 2**20 if wb else sum(
                p.stat().st_size for p in directory.iterdir() if p.suffix in (".onnx", ".data")) / 2**20
    return engines, weights_mb, checks


def run(plan: Plan, venv: Path, work: Path, command: str) -> dict:
    started = time.time()
    load_start = round(os.getloadavg()[0], 2)
    from samout_edge.bench import machine

    shape, ours_params = shape_for_preset(plan.preset)
    print(f"llama: n_ff {shape.n_ff}, {shape.parameter_count():,} parameters (ours {ours_params:,})", flush=True)
    engines, weights_mb, checks = prepare_exports(plan, work)
    logs = work / "logs"
    llama_version = ensure_venv(venv, LLAMA_CPP_VERSION, logs / "build.log")
    steps = plan.warmup + plan.decode_steps + 1
    max_seq = export_max_seq(plan)
    env = tree_env()
    proc = subprocess.run([peers_python(venv), str(Path(__file__).resolve()), "--make-ggufs",
                           json.dumps({"work": str(work), "shape": asdict(shape), "types": plan.llama_types,
                                       "threads": max(plan.threads)})],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"making the GGUFs failed:\n{proc.stderr[-3000:]}")
    ggufs = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in plan.llama_types:
        for fa in plan.flash_attn:
            e = Engine("llama.cpp", "llama", name, ggufs[name]["path"], fa)
            engines.append(e)
            weights_mb[e.key] = ggufs[name]["bytes"] / 2**20

    def spec(e: Engine, threads: int) -> dict:
        return {"family": e.family, "backend": "native" if e.form in NATIVE_FORMS else "ort", "path": e.path,
                "threads": threads, "n_batch": plan.n_batch,
                "n_ubatch": plan.n_ubatch, "flash_attn": e.flash_attn, "amx": plan.llama_amx}

    def worker(e: Engine, tag: str) -> Worker:
        python = sys.executable if e.family == "ours" else peers_python(venv)
        wenv = dict(env) if e.family == "ours" else {**env, "OMP_WAIT_POLICY": "passive"}
        return Worker(python, wenv, logs / f"{tag}-{e.key.replace(' ', '_')}.log")

    timings, loads, system_info, buffers = [], [], None, {}
    for threads in plan.threads:
        workers: dict[str, Worker] = {}
        try:
            for e in engines:
                w = worker(e, f"t{threads}")
                r = w.ask(op="load", spec=spec(e, threads))
                if not r["ok"]:
                    print(f"  {e.key}: cannot load: {r['error']}", flush=True)
                    w.close()
                    continue
                workers[e.key] = w
                system_info = r.get("system_info", system_info)
                if e.family == "llama.cpp" and e.form not in buffers:
                    buffers[e.form] = llama_buffers(w.log_text())
                loads.append({"engine": e.key, "threads": threads, "load_s": r["load_s"], "rss_mb": r["rss_mb"]})
            for length in plan.contexts:
                for mode in plan.modes:
                    print(f"threads {threads}, {mode} {length}", flush=True)
                    ready, failed = {}, {}
                    for k, w in workers.items():
                        r = w.ask(op="setup", mode=mode, length=length, steps=steps)
                        (ready.__setitem__(k, w) if r["ok"] else failed.__setitem__(k, r["error"]))
                    results = series(ready, mode, plan)
                    results.update({k: {"error": v} for k, v in failed.items()})
                    for k, res in results.items():
                        s = summary(res.get("samples", []))
                        rec = {"engine": k, "threads": threads, "mode": mode, "length": length,
                               "median_ms": s["median"], "p90_ms": s["p90"], "n": s["n"],
                               "samples_ms": [round(x, 4) for x in res.get("samples", [])]}
                        if "error" in res:
                            rec["error"] = res["error"][:200]
                            print(f"  {k}: {rec['error']}", flush=True)
                        timings.append(rec)
        finally:
            for w in workers.values():
                w.close()

    memory = []
    if plan.memory:
        for length in plan.contexts:
            for e in engines:
                print(f"memory {e.key} {length}", flush=True)
                w = worker(e, "mem")
                try:
                    r = w.ask(op="memory", spec={**spec(e, plan.memory_threads), "length": length})
                finally:
                    w.close()
                rec = {"engine": e.key, "length": length, "threads": plan.memory_threads}
                rec.update({k: v for k, v in r.items() if k != "ok"} if r["ok"] else {"error": r["error"][:200]})
                memory.append(rec)

    info = machine.describe()
    flags = machine_flags()
    info.update({
        "llama_cpp_python": llama_version, "llama_cmake_args": f"CMAKE_ARGS=\"{CMAKE_ARGS}\"",
        "llama_system_info": system_info, "cpu_flags": flags,
        "flags_note": "CPU flags: " + (", ".join(flags) or "no AVX"),
        "load_start": load_start, "load_end": round(os.getloadavg()[0], 2),
    })
    return {
        "machine": info,
        "config": {**asdict(plan), "max_seq": max_seq, "steps_built": steps},
        "command": command,
        "elapsed_s": time.time() - started,
        "ours_parameters": ours_params,
        "llama_shape": shape.to_dict(),
        "engines": [{**asdict(e), "key": e.key, "weights_mb": weights_mb.get(e.key), "check": checks.get(e.key)}
                    for e in engines],
        "gguf_types": {k: {"bytes": v["bytes"], "tensor_types": v["tensor_types"], **buffers.get(k, {})}
                       for k, v in ggufs.items()},
        "loads": loads,
        "timings": timings,
        "memory": memory,
        "notes": [],
    }


def llama_buffers(log: str) -> dict:
    """Where llama.cpp put the weights, from its load report: MiB per buffer type and how it
    repacked tensors (e.g. q4_0_8x8: 43)."""
    import re

    sizes = {m[0]: float(m[1]) for m in re.findall(r"(\S+) model buffer size =\s+([\d.]+) MiB", log)}
    repacked: dict[str, int] = {}
    for kind in re.findall(r"repack tensor \S+ with (\S+)", log):
        repacked[kind] = repacked.get(kind, 0) + 1
    return {"model_buffers_mib": sizes, "repacked": repacked}


def machine_flags() -> list[str]:
    try:
        line = next((x for x in open("/proc/cpuinfo") if x.startswith("flags")), "")
    except OSError:
        return []
    have = set(line.split(":", 1)[-1].split())
    return [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                        "amx_int8") if f in have]


def parse_tokens(text: str) -> list[int]:
    """'256,1k,4K,16k' -> [256, 1024, 4096, 16384]."""
    out = []
    for x in (x.strip().lower() for x in text.split(",")):
        if x:
            out.append(int(x[:-1]) * 1024 if x.endswith("k") else int(x))
    if not out or min(out) < 1:
        raise SystemExit(f"expected positive integers, got {text!r}")
    return out


def _names(text: str, allowed, what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return names


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main()
    if argv[:1] == ["--make-ggufs"]:
        return make_ggufs_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="seed")
    p.add_argument("--contexts", default="256,1024,4096", help="tokens, comma-separated (16k allowed: 16k = 16384)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--archs", default="cummax", help=f"ours, comma-separated: {', '.join(ALL_ARCHS)} (or any arch)")
    p.add_argument("--forms", default=",".join(DEFAULT_FORMS), help=f"ours: {', '.join(FORMS)}")
    p.add_argument("--llama-types", default=",".join(DEFAULT_LLAMA_TYPES), help=", ".join(LLAMA_TYPES))
    p.add_argument("--full", action="store_true", help="every arch, contexts 256,1024,4096,16384 (hours on 2 cores)")
    p.add_argument("--modes", default="prefill,decode")
    p.add_argument("--warmup", type=int, default=Plan.warmup)
    p.add_argument("--prefill-rounds", type=int, default=Plan.prefill_rounds)
    p.add_argument("--decode-steps", type=int, default=Plan.decode_steps)
    p.add_argument("--min-rounds", type=int, default=Plan.min_rounds)
    p.add_argument("--seconds", type=float, default=Plan.seconds, help="per engine and point, once min-rounds ran")
    p.add_argument("--n-batch", type=int, default=Plan.n_batch, help="llama.cpp's n_batch (its default 512)")
    p.add_argument("--n-ubatch", type=int, default=Plan.n_ubatch)
    p.add_argument("--flash-attn", default="auto,off",
                   help="llama.cpp engines per setting, comma-separated: auto (its default), on, off")
    p.add_argument("--llama-amx", action="store_true",
                   help="let llama.cpp use AMX where the CPU has it (default: refused, see forbid_amx)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-threads", type=int, default=Plan.memory_threads)
    p.add_argument("--max-seq", type=int, default=0, help="our exports' max_seq (0: bench's rule)")
    p.add_argument("--no-verify", action="store_true", help="export without checking against PyTorch")
    p.add_argument("--venv", type=Path, default=ROOT / ".venv-peers")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "peers")
    p.add_argument("--markdown", type=Path, default=RESULTS / "cpu-peers.md")
    p.add_argument("--json", type=Path, default=RESULTS / "cpu-peers.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "cpu-peers.png")
    p.add_argument("--exports-only", action="store_true", help="make (or find) our exports, then stop")
    p.add_argument("--render", type=Path, help="write the Markdown and the plot again from this JSON, then stop")
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes")
    a = p.parse_args(argv)
    plan = Plan(
        preset=a.preset, contexts=parse_tokens(a.contexts), threads=parse_tokens(a.threads),
        archs=[x.strip() for x in a.archs.split(",") if x.strip()],
        forms=_names(a.forms, FORMS, "form"), llama_types=_names(a.llama_types, LLAMA_TYPES, "llama type"),
        modes=_names(a.modes, ("prefill", "decode"), "mode"), warmup=a.warmup, prefill_rounds=a.prefill_rounds,
        decode_steps=a.decode_steps, min_rounds=a.min_rounds, seconds=a.seconds, n_batch=a.n_batch,
        n_ubatch=a.n_ubatch, flash_attn=_names(a.flash_attn, ("auto", "on", "off"), "flash-attn setting"), llama_amx=a.llama_amx, memory=not a.no_memory, memory_threads=a.memory_threads,
        max_seq=a.max_seq, verify=not a.no_verify)
    if a.full:
        plan.archs, plan.contexts = list(ALL_ARCHS), [256, 1024, 4096, 16384]
    if a.render:
        report = json.loads(a.render.read_text())
        a.markdown.write_text(markdown(report))
        plot(report, a.plot)
        return
    if a.exports_only:
        for e in prepare_exports(plan, a.work)[0]:
            print(e.path)
        return
    command = "python benchmarks/peers.py " + " ".join(argv)
    report = run(plan, a.venv, a.work, command.strip())
    report["notes"] = list(a.note)
    for path in (a.markdown, a.json, a.plot):
        path.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(report, indent=1) + "\n")
    a.markdown.write_text(markdown(report))
    drawn = plot(report, a.plot)
    print(f"wrote {a.markdown}, {a.json}" + (f", {a.plot}" if drawn else ""), flush=True)


if __name__ == "__main__":
    main()
