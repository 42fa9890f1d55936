"""Bench results as rows (every arch at each point, beside the first), Markdown, JSON and a plot."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

from samout_edge.artifact.files import write_bytes_atomic, write_json_atomic
from samout_edge.bench.suite import BenchReport, Record


@dataclass
class PointRow:
    """One point of the bench (backend, mode, batch, length) with every arch's record,
    in the bench's order; the first arch is the one the others are measured against."""

    backend: str
    provider: str
    mode: str
    batch: int
    length: int  # prefill seq or decode context
    records: dict[str, Record]

    @property
    def base(self) -> Record:
        return next(iter(self.records.values()))

    def ratio(self, arch: str) -> float | None:
        """arch / first arch median latency: above 1 means the first arch is faster (None: one was not run)."""
        r, b = self.records[arch], self.base
        if r.refused or b.refused:
            return None
        return r.latency_ms["median"] / b.latency_ms["median"]


def point_rows(report: BenchReport) -> list[PointRow]:
    order = list(report.exports) or list(dict.fromkeys(r.arch for r in report.records))
    by_key: dict[tuple, dict[str, Record]] = {}
    for r in report.records:
        by_key.setdefault((r.backend, r.provider, r.mode, r.batch, r.length), {})[r.arch] = r
    return [PointRow(*key, {a: recs[a] for a in order if a in recs}) for key, recs in by_key.items()]


def short_provider(provider: str) -> str:
    return provider.replace("ExecutionProvider", "").lower()


def fmt_mb(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


def headers(report: BenchReport) -> list[str]:
    base = next(iter(report.exports), "first")
    return ["backend", "mode", "batch", "tokens", "arch", "ms", f"x {base}", "roofline", "peak MB", "state",
            "weights MiB"]


def fmt_mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:,.1f}"


def fmt_ms(record: Record) -> str:
    """The median, or why the point was not run, short (the JSON has the whole reason)."""
    if not record.refused:
        return f"{record.latency_ms['median']:.2f}"
    return "> kv-budget" if record.refused.startswith("KV cache") else \
        ("out of memory" if "memory" in record.refused else "refused")


def table_rows(row: PointRow) -> list[list[str]]:
    """The point's cells, one line per arch: the first line names the point."""
    lines = []
    for i, (arch, r) in enumerate(row.records.items()):
        ratio = row.ratio(arch)
        point = [f"{row.backend}:{short_provider(row.provider)}", row.mode, str(row.batch), str(row.length)]
        lines.append([*(point if i == 0 else ["", "", "", ""]), arch, fmt_ms(r),
                      "-" if ratio is None else f"{ratio:.2f}x", "-" if r.roofline is None else f"{r.roofline:.0%}",
                      fmt_mb(r.peak_mem_mb), fmt_bytes(r.state_bytes),
                      f"{r.weights} {fmt_mib(r.weights_bytes)}"])
    return lines


def to_markdown(report: BenchReport) -> str:
    cfg = report.config
    spinning = (cfg.get("settings") or {}).get("spinning", cfg.get("ort_spinning"))  # reports before "settings"
    names = list(report.exports)
    head = headers(report)
    bandwidth = report.machine.get("memory_bandwidth")
    lines = [
        f"# samout-edge bench: {', '.join(names)}",
        "",
        f"Machine: {report.machine['label']} ({report.machine['memory_gib']} GiB, torch {report.machine['torch']}, "
        f"onnxruntime {report.machine['onnxruntime']}). Model: hidden {cfg['hidden_size']}, {cfg['num_heads']} heads, "
        f"{cfg['num_layers']} layers, vocab {cfg['vocab_size']}, {cfg['dtype']}, lowering {cfg['lowering']}/{cfg['scan']}"
        f"; ONNX Runtime intra-op spinning {'off' if spinning is False else 'on'}.",  # None: ORT's default, on
        f"Latency: median ms of interleaved runs (prefill: one call over `tokens`; decode: one token after `tokens` of "
        f"context). {head[6]}: the arch's latency over {names[0] if names else 'the first'}'s at the same point. "
        "roofline (decode): the time the step's bytes (weights as stored but the embedding table, the state read "
        "and written) take at the machine's memory bandwidth, over the measured time: 100% is the bandwidth limit"
        + (f" ({bandwidth['gb_per_s']:.1f} GB/s: {bandwidth['method']}, {bandwidth['threads']} threads)"
           if bandwidth else "") + ". "
        "peak MB: measured peak above the loaded model. state: analytic bytes after `tokens` (a running max, a KV "
        "cache, a window). weights MiB: the weights' kind and the bytes model.onnx stores them in.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for row in point_rows(report) for cells in table_rows(row)]
    return "\n".join(lines) + "\n"


def save_results(data: dict, markdown: str, json_path: Path | None, markdown_path: Path | None) -> None:
    """A benchmark script's results, each file written beside its target and renamed into
    place (the ones asked for): a run killed midway leaves the previous results whole."""
    if json_path:
        write_json_atomic(json_path, data)
    if markdown_path:
        write_bytes_atomic(markdown_path, markdown.encode())


def save_json(report: BenchReport, path: str | Path) -> None:
    write_bytes_atomic(path, (json.dumps(report.to_dict(), indent=2) + "\n").encode())


def save_markdown(report: BenchReport, path: str | Path) -> None:
    write_bytes_atomic(path, to_markdown(report).encode())


def save_plot(report: BenchReport, path: str | Path) -> None:
    """Latency (top) and memory (bottom) against length for prefill and decode, every arch
    (one line style each), log axes, titled with the machine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = point_rows(report)
    batch = min(r.batch for r in rows)
    rows = [r for r in rows if r.batch == batch]
    archs = list(report.exports) or list(rows[0].records)
    styles = dict(zip(archs, ("o-", "s--", "^-.", "v:", "D-", "x--", "*-.")))
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
            for arch in archs:
                run = [(r.length, r.records[arch]) for r in pts if arch in r.records and not r.records[arch].refused]
                if run:
                    ax_lat.plot([x for x, _ in run], [rec.latency_ms["median"] for _, rec in run], styles.get(arch, "o-"),
                                color=color, label=f"{arch} {name}")
                peaks = [(x, rec.peak_mem_mb) for x, rec in run if rec.peak_mem_mb]
                if peaks:
                    ax_mem.plot([x for x, _ in peaks], [m for _, m in peaks], styles.get(arch, "o-"), color=color,
                                label=f"{arch} peak {name}")
        if mode == "decode":
            pts = {r.length: r for r in rows if r.mode == "decode"}
            xs = sorted(pts)
            for arch in archs:
                ax_mem.plot(xs, [pts[x].records[arch].state_bytes / 2**20 if arch in pts[x].records else float("nan")
                                 for x in xs], styles.get(arch, "o-"), color="k", alpha=0.5, label=f"{arch} state (analytic)")
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
    fig.suptitle(f"{', '.join(archs)}: hidden {cfg['hidden_size']}, {cfg['num_layers']} layers, "
                 f"{cfg['dtype']}, batch {batch}, on {report.machine['label']}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
