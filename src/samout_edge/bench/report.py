"""Bench results as rows (cummax beside softmax), Markdown, JSON and a plot."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

from samout_edge.artifact.files import write_bytes_atomic
from samout_edge.bench.suite import BenchReport, Record


@dataclass
class PairRow:
    backend: str
    provider: str
    mode: str
    batch: int
    length: int  # prefill seq or decode context
    cummax: Record
    softmax: Record

    @property
    def latency_ratio(self) -> float | None:
        """cummax / softmax median latency: below 1 means SamOut is faster (None: one was not run)."""
        if self.cummax.refused or self.softmax.refused:
            return None
        return self.cummax.latency_ms["median"] / self.softmax.latency_ms["median"]

    @property
    def memory_ratio(self) -> float | None:
        a, b = self.cummax.peak_mem_mb, self.softmax.peak_mem_mb
        return a / b if a is not None and b else None

    @property
    def state_ratio(self) -> float:
        return self.cummax.state_bytes / self.softmax.state_bytes if self.softmax.state_bytes else float("nan")


def pair_rows(report: BenchReport) -> list[PairRow]:
    by_key: dict[tuple, dict[str, Record]] = {}
    for r in report.records:
        by_key.setdefault((r.backend, r.provider, r.mode, r.batch, r.length), {})[r.arch] = r
    return [PairRow(*key, pair["cummax"], pair["softmax"]) for key, pair in by_key.items()
            if "cummax" in pair and "softmax" in pair]


def short_provider(provider: str) -> str:
    return provider.replace("ExecutionProvider", "").lower()


def fmt_mb(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


HEADERS = ["backend", "mode", "batch", "tokens", "cummax ms", "softmax ms", "ratio",
           "cummax MB", "softmax MB", "cummax state", "KV cache", "weights MiB"]


def fmt_weights(row: PairRow) -> str:
    """Kind and MiB of the weights as stored: ``int4 0.9``, or ``int4 0.9/1.0`` (cummax/softmax) where they differ."""
    c, s = row.cummax, row.softmax
    sizes = [fmt_mib(r.weights_bytes) for r in (c, s)]
    kinds = c.weights if c.weights == s.weights else f"{c.weights}/{s.weights}"
    return f"{kinds} {sizes[0] if sizes[0] == sizes[1] else '/'.join(sizes)}"


def fmt_mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:,.1f}"


def fmt_ms(record: Record) -> str:
    """The median, or why the point was not run, short (the JSON has the whole reason)."""
    if not record.refused:
        return f"{record.latency_ms['median']:.2f}"
    return "> kv-budget" if record.refused.startswith("KV cache") else \
        ("out of memory" if "memory" in record.refused else "refused")


def table_cells(row: PairRow) -> list[str]:
    c, s = row.cummax, row.softmax
    ratio = "-" if row.latency_ratio is None else f"{row.latency_ratio:.2f}x"
    return [
        f"{row.backend}:{short_provider(row.provider)}", row.mode, str(row.batch), str(row.length),
        fmt_ms(c), fmt_ms(s), ratio,
        fmt_mb(c.peak_mem_mb), fmt_mb(s.peak_mem_mb), fmt_bytes(c.state_bytes), fmt_bytes(s.state_bytes),
        fmt_weights(row),
    ]


def to_markdown(report: BenchReport) -> str:
    cfg = report.config
    lines = [
        "# samout-edge bench: SamOut (cummax) vs softmax attention",
        "",
        f"Machine: {report.machine['label']} ({report.machine['memory_gib']} GiB, torch {report.machine['torch']}, "
        f"onnxruntime {report.machine['onnxruntime']}). Model: hidden {cfg['hidden_size']}, {cfg['num_heads']} heads, "
        f"{cfg['num_layers']} layers, vocab {cfg['vocab_size']}, {cfg['dtype']}, lowering {cfg['lowering']}/{cfg['scan']}"
        f"; ONNX Runtime intra-op spinning {'on' if cfg.get('ort_spinning', True) else 'off'}.",
        "Latency: median ms of interleaved runs (prefill: one call over `tokens`; decode: one token after `tokens` of "
        "context). ratio = cummax / softmax latency: below 1 means SamOut is faster. MB: measured peak above the "
        "loaded model. state and KV cache: analytic bytes after `tokens`. weights MiB: the weights' kind and the bytes "
        "model.onnx stores them in (cummax/softmax where they differ).",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join("---" for _ in HEADERS) + "|",
    ]
    lines += ["| " + " | ".join(table_cells(row)) + " |" for row in pair_rows(report)]
    return "\n".join(lines) + "\n"


def save_json(report: BenchReport, path: str | Path) -> None:
    write_bytes_atomic(path, (json.dumps(report.to_dict(), indent=2) + "\n").encode())


def save_markdown(report: BenchReport, path: str | Path) -> None:
    write_bytes_atomic(path, to_markdown(report).encode())


def save_plot(report: BenchReport, path: str | Path) -> None:
    """Latency (top) and memory (bottom) against length for prefill and decode, both archs,
    log axes, titled with the machine. Solid: cummax; dashed: softmax."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = pair_rows(report)
    batch = min(r.batch for r in rows)
    rows = [r for r in rows if r.batch == batch]
    modes = [m for m in ("prefill", "decode") if any(r.mode == m for r in rows)]
    fig, axes = plt.subplots(2, len(modes), figsize=(6.5 * len(modes), 9), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    targets = sorted({(r.backend, short_provider(r.provider)) for r in rows})
    for col, mode in enumerate(modes):
        ax_lat, ax_mem = axes[0][col], axes[1][col]
        for i, (backend, provider) in enumerate(targets):
            pts = sorted((r for r in rows if r.mode == mode and (r.backend, short_provider(r.provider)) == (backend, provider)),
                         key=lambda r: r.length)
            if not pts:
                continue
            color, name = colors[i % len(colors)], f"{backend}:{provider}"
            for arch, style in (("cummax", "o-"), ("softmax", "s--")):
                run = [(r.length, getattr(r, arch)) for r in pts if not getattr(r, arch).refused]
                if run:
                    ax_lat.plot([x for x, _ in run], [rec.latency_ms["median"] for _, rec in run], style, color=color,
                                label=f"{arch} {name}")
                peaks = [(x, rec.peak_mem_mb) for x, rec in run if rec.peak_mem_mb]
                if peaks:
                    ax_mem.plot([x for x, _ in peaks], [m for _, m in peaks], style, color=color,
                                label=f"{arch} peak {name}")
        if mode == "decode":
            pts = {r.length: r for r in rows if r.mode == "decode"}
            xs = sorted(pts)
            ax_mem.plot(xs, [pts[x].cummax.state_bytes / 2**20 for x in xs], "k:", marker="o", label="cummax state (analytic)")
            ax_mem.plot(xs, [pts[x].softmax.state_bytes / 2**20 for x in xs], "k-.", marker="s", label="KV cache (analytic)")
        what = "sequence length" if mode == "prefill" else "context before the step"
        ax_lat.set_title(f"{mode}: latency per call" if mode == "prefill" else "decode: latency per token")
        ax_mem.set_title(f"{mode}: peak memory above the model" + (", and state" if mode == "decode" else ""))
        for ax, ylabel in ((ax_lat, "median ms"), (ax_mem, "MB")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(f"{what}, tokens")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    cfg = report.config
    fig.suptitle(f"SamOut (cummax, solid) vs softmax (dashed): hidden {cfg['hidden_size']}, {cfg['num_layers']} layers, "
                 f"{cfg['dtype']}, batch {batch}, on {report.machine['label']}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
