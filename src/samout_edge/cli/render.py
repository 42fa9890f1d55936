"""How each command's result looks on a terminal: Rich tables, nothing else.

The commands in app.py parse options and call the library; everything a person
reads is drawn here, so app.py stays a list of commands.
"""

from __future__ import annotations

import re
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from samout_edge.artifact.config import ARCHS
from samout_edge.artifact.golden import polygraphy_line
from samout_edge.artifact.manifest import runtime_notes
from samout_edge.artifact.tokenizer_files import tokenizer_note
from samout_edge.cli.ui import console, human_bytes, ok


def verification(result) -> None:
    against = "golden PyTorch fp32 outputs" if result.reference == "golden" else "PyTorch fp32, recomputed"
    table = Table(title=escape(f"verify vs {against} (tolerance {result.rtol:g} x max|ref|, {result.provider})"))
    for col in ("check", "output", "max abs err", "tolerance", "result"):
        table.add_column(col, justify="right" if col in ("max abs err", "tolerance") else "left")
    op_lengths = ",".join(str(n) for n in result.lengths)
    table.add_row(f"cummax op, seq {op_lengths}", "both axes", "0" if result.op_exact else "differs", "bit-exact",
                  ok(result.op_exact))
    for check, c in _collapse_every_id(result.checks):
        layer = re.search(r"\.(\d+)(\.|$)", c.worst)
        output = f"{c.output} (layer {layer.group(1)})" if layer else c.output
        table.add_row(check, output, f"{c.max_abs_err:.2e}", f"{c.tolerance:.2e}", ok(c.passed))
    console.print(table)
    for line in result.skipped:
        console.print(f"not checked: {escape(line)}", highlight=False)
    if result.fp16_arithmetic:
        why = "" if "itself" in result.fp16_arithmetic else \
            " (ONNX Runtime's CPU provider computes fp16 graphs in fp32 on this CPU)"
        console.print(escape(f"fp16 arithmetic: {result.fp16_arithmetic}{why}"), highlight=False)
    console.print(f"verification {'[green]passed[/]' if result.passed else '[red]FAILED[/]'} in {result.seconds:.1f} s")


def _collapse_every_id(checks: list) -> list[tuple[str, object]]:
    """The "every id" cases (one per chunk of the vocabulary) as one row per output: the worst."""
    from samout_edge.artifact.golden import EVERY_ID

    rows: list[tuple[str, object]] = []
    chunks: dict[str, list] = {}
    for c in checks:
        if c.check.startswith(EVERY_ID):
            if c.output not in chunks:
                chunks[c.output] = []
                rows.append((c.output, None))  # placeholder, keeps the order
            chunks[c.output].append(c)
        else:
            rows.append((c.check, c))
    out = []
    for check, c in rows:
        if c is None:
            group = chunks[check]
            worst = max(group, key=lambda r: r.max_abs_err / r.tolerance if r.tolerance else float("inf"))
            calls = len({r.check for r in group})
            last = group[-1].check.removeprefix(EVERY_ID).split("..", 1)[-1]  # "9999", or "9999 by 118"
            label = f"{EVERY_ID} (0..{last}, {calls} call{'s' * (calls > 1)})"
            out.append((label, type(worst)(**{**worst.__dict__, "passed": all(r.passed for r in group)})))
        else:
            out.append((check, c))
    return out


def lint(reports: list[dict], shown: int = 4) -> None:
    """One row per TensorRT version; identical findings on many nodes collapse into one line."""
    table = Table(title="TensorRT compatibility (ONNX parser operator support, per release)")
    for col in ("TensorRT", "ships with", "verdict", "findings"):
        table.add_column(col)
    for r in reports:
        groups: dict[tuple, list[str]] = {}
        for i in r["issues"]:
            groups.setdefault((i["severity"], i["op"], i["message"]), []).append(i["node"])
        ordered = sorted(groups.items(), key=lambda kv: {"error": 0, "warning": 1, "note": 2}[kv[0][0]])
        lines = []
        for (severity, op, message), nodes in ordered[:shown]:
            where = nodes[0] if len(nodes) == 1 else f"{len(nodes)} nodes, e.g. {nodes[0]}"
            lines.append(f"{severity}: {op} [{where}]: {message}")
        if len(ordered) > shown:
            lines.append(f"... and {len(ordered) - shown} more kinds (inspect --json lists all)")
        errors = sum(len(n) for (sev, _, _), n in groups.items() if sev == "error")
        verdict = "[green]compatible[/]" if r["compatible"] else f"[red]{errors} node(s) fail[/]"
        table.add_row(r["version"], r["field"], verdict, escape("\n".join(lines)) or "-")
    console.print(table)


def build_plan(plan) -> None:
    table = Table(title=escape(f"build plan: {plan.export_dir} for {plan.profile} (TensorRT {plan.tensorrt}, "
                               f"{plan.tensorrt_source})"), show_header=False)
    table.add_column("setting")
    table.add_column("value")
    rows = [
        ("arch / export dtype", f"{plan.arch} / {plan.export_dtype}"),
        ("engine precision", plan.precision),
        ("strongly typed network", str(plan.strongly_typed)),
        ("FP16 builder flag", str(plan.fp16_flag)),
        ("EXPLICIT_BATCH flag", str(plan.explicit_batch_flag)),
        ("workspace", human_bytes(plan.workspace_bytes)),
        ("builder optimization level", "-" if plan.builder_optimization_level is None else str(plan.builder_optimization_level)),
        ("timing cache", plan.timing_cache),
        ("DLA core", "-" if plan.dla_core is None else f"{plan.dla_core} (GPU fallback)"),
        ("plugins", ", ".join(plan.plugins) or "none"),
        ("scan nodes run", {"aot": "the plugins, ahead of time", "jit": "the plugins, just in time",
                              "function": "their function body (the native scan)"}.get(plan.cummax, "-")),
        ("engine", plan.engine),
    ]
    for key, value in rows:
        table.add_row(key, escape(value))
    for index, prof in enumerate(plan.optimization_profiles):
        for s in prof.shapes:
            table.add_row(f"profile {index} ({prof.name}) {s.name}", escape(f"min {s.min}  opt {s.opt}  max {s.max}"))
    console.print(table)
    for note in plan.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    console.print("trtexec equivalent:", highlight=False)
    console.print(plan.trtexec, highlight=False, soft_wrap=True, markup=False)


def export_summary(result) -> None:
    """What `samout-edge export` wrote: the artifact, its weights (quantized: kind, format, block, bytes, why),
    then the verification table."""
    m = result.manifest
    console.print(
        f"exported [bold]{m.arch}[/] ({m.dtype}, {m.lowering}/{m.scan['scan']}, max_seq {m.max_seq}) "
        f"to {escape(str(result.directory))}: model.onnx {human_bytes(result.model_bytes)} in {result.seconds:.1f} s",
        highlight=False,
    )
    for line in (*m.weights.describe(), precision_line(m.precision), tokenizer_note(m)):
        if line:
            console.print(escape(line), highlight=False, soft_wrap=True)
    runtimes(runtime_notes(m), polygraphy_line(m))
    if result.verification is not None:
        verification(result.verification)


def precision_line(precision: dict | None) -> str | None:
    """One line on an fp16 export's range: its fp32 islands and the peaks that chose them."""
    if not precision:
        return None
    islands = precision.get("fp32_islands") or []
    peaks = precision.get("peaks") or {}
    top = max(peaks.items(), key=lambda kv: kv[1], default=("-", 0.0))
    where = ", ".join(islands) if islands else "none needed"
    check = precision.get("pytorch_fp16") or {}
    checked = (f"; computed in fp16 (PyTorch) on {check.get('cases')} golden cases: worst "
               f"{check.get('worst_relative_error', 0):.1e} of the scale") if check else ""
    text = (precision.get("calibration") or {}).get("text")
    calibrated = (f"; calibrated on {text.get('tokens', 0):,} tokens of text (sha256 {str(text.get('sha256'))[:12]}) "
                  "and the golden cases" if text else "; calibrated on random ids only (no text: a preset's random "
                  "weights, or an export made before text was required)")
    return (f"fp16: fp32 islands: {where} (largest value {top[1]:,.0f} in {top[0]}; limit "
            f"{precision.get('limit', 0):,.0f} = 65,504 / headroom {precision.get('headroom', 0):g}"
            f"{', widened to every layer' if precision.get('widened') else ''}){calibrated}{checked}")


def runtimes(notes: list[str], polygraphy: str | None) -> None:
    """What other runtimes need besides the file, and the Polygraphy line that checks it."""
    for note in notes:
        console.print(escape(f"needs, outside the file: {note}"), highlight=False, soft_wrap=True)
    if polygraphy:
        console.print(escape(f"check with Polygraphy (in the export directory): {polygraphy}"), highlight=False,
                      soft_wrap=True)


def inspect(result) -> None:
    console.print(
        f"[bold]{escape(result.path)}[/]: arch {result.arch or '?'}, dtype {result.dtype or '?'}, "
        f"lowering {result.lowering or '?'}, max_seq {result.max_seq or '?'}"
    )
    console.print(f"parameters: {result.parameter_count:,} ({human_bytes(result.parameter_bytes)}), "
                  f"nodes: {result.node_count}, opsets: {result.opsets}")
    if result.runs_in:
        console.print(f"runs in: {escape(result.runs_in)}", highlight=False)
    for note in result.arch_notes:
        console.print(escape(note), highlight=False)
    for line in result.quantization:  # the words export's summary printed (artifact/quantization.py describe)
        console.print(escape(line), highlight=False, soft_wrap=True)
    if result.tokenizer:
        console.print(escape(result.tokenizer), highlight=False, soft_wrap=True)
    io_table = Table(title="inputs and outputs")
    for col in ("", "name", "dtype", "shape"):
        io_table.add_column(col)
    for kind, values in (("in", result.inputs), ("out", result.outputs)):
        for v in values:
            io_table.add_row(kind, v["name"], v["dtype"], escape("[" + ", ".join(str(d) for d in v["shape"]) + "]"))
    console.print(io_table)
    ops = Table(title="op histogram")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in result.op_histogram.items():
        ops.add_row(op, str(count))
    console.print(ops)
    if result.custom_nodes:
        console.print("custom-domain nodes: " + ", ".join(f"{k} x{v}" for k, v in result.custom_nodes.items())
                      + (f"; local functions: {', '.join(result.functions)}" if result.functions else ""))
    else:
        console.print("custom-domain nodes: none (standard ONNX ops only)")
    if result.verification:
        v = result.verification
        errs = ", ".join(f"{k} {e:.1e}" for k, e in v["max_abs_err"].items())
        console.print(f"verification: {ok(v['passed'])} (rtol {v['rtol']}; max abs err {errs})")
    line = precision_line(result.precision)
    if line:
        console.print(escape(line), highlight=False, soft_wrap=True)
    runtimes(result.runtime_notes, result.polygraphy)
    if result.lint:
        lint(result.lint)


def doctor(report: dict) -> None:
    table = Table(title="samout-edge doctor", show_header=False)
    table.add_column("what")
    table.add_column("found")
    missing = "[yellow]not installed[/]"
    table.add_row("python", f"{report['python']} ({report['platform']})")
    for key in ("samout_edge", "torch", "onnx", "onnxscript", "onnxruntime"):
        table.add_row(key, report[key] or missing)
    table.add_row("onnxruntime providers", ", ".join(report["onnxruntime_providers"]) or "-")
    cpu = report.get("cpu") or {}
    if cpu:
        yes = {True: "yes", False: "no"}
        table.add_row("CPU kernels", f"{cpu['kernel_family']} ({cpu['machine']}): fp16 arithmetic "
                      f"{yes[cpu['fp16_arithmetic']]} (ONNX Runtime computes fp16 graphs "
                      f"{'in fp16' if cpu['fp16_arithmetic'] else 'in fp32'}), int8 dot product "
                      f"{yes[cpu['int8_dot_product']]}")
    table.add_row("CUDA", report["cuda"] or "[yellow]no CUDA device[/]")
    for gpu in report["gpus"]:
        table.add_row(f"GPU {gpu['index']}", f"{gpu['name']} (sm {gpu['compute_capability']}, {gpu['memory_gib']} GiB)")
    table.add_row("TensorRT", report["tensorrt"] or missing)
    table.add_row("Triton", report["triton"] or missing)
    jetson = report["jetson"]
    table.add_row("Jetson", f"{jetson.get('model', '?')}, L4T {jetson.get('l4t', '?')}, JetPack {jetson.get('jetpack', '?')}"
                  if jetson else "not a Jetson")
    for b in report.get("backends", []):
        needs = "; ".join(b["missing"])
        table.add_row(f"backend {escape(b['name'])}", (f"[yellow]needs {escape(needs)}[/]" if needs else "installed")
                      + (" (needs a GPU)" if b["gpu"] else ""))
    console.print(table)


def profiles(profiles) -> None:
    table = Table(title="device profiles (samout-edge profiles show NAME)")
    for col in ("name", "kind", "sm", "memory / budget GiB", "TensorRT", "JetPack", "precision", "DLA",
                "prefill seq", "decode context"):
        table.add_column(col, no_wrap=col == "name")
    for p in profiles:
        table.add_row(escape(p.name), p.kind, p.compute_capability, f"{p.memory_gib:g} / {p.memory_budget_gib:g}",
                      p.tensorrt, p.jetpack or "-", p.precision, str(p.dla_cores),
                      "..".join(str(v) for v in (p.prefill.seq.min, p.prefill.seq.max)),
                      "..".join(str(v) for v in (p.decode.context.min, p.decode.context.max)))
    console.print(table)


def profile(profile, data: dict) -> None:
    table = Table(title=escape(f"profile {profile.name}"), show_header=False)
    table.add_column("field")
    table.add_column("value")
    for key, value in data.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                label = f"{key}.{sub}" + (" (min, opt, max)" if key in ("prefill", "decode") else "")
                table.add_row(label, escape(str(v)))
        else:
            table.add_row(key, escape(str(value)))
    console.print(table)


def memory_plan(result, device, config, batch: int) -> None:
    mib = lambda n: f"{n / 2**20:,.0f}"  # noqa: E731
    kind = getattr(result, "weights_kind", "fp") or "fp"
    archs = list(result.longest)
    table = Table(title=f"memory plan on {escape(device.name)}: budget {device.memory_budget_gib:g} GiB of {device.memory_gib:g}, "
                        f"{result.dtype}, {kind} weights, batch {batch}, hidden {config.hidden_size} x "
                        f"{config.num_layers} layers (MiB; state x2: the state and its copy as the next input)")
    for col in ("context", f"weights ({kind})", "runtime", *(f"{a} {what}" for a in archs for what in ("state x2", "total"))):
        table.add_column(col, justify="right")
    for row in result.rows:
        first = next(iter(row.archs.values()))
        cells = [f"{row.context:,}", f"{first.weights / 2**20:,.1f}", mib(first.runtime)]
        for arch, b in row.archs.items():
            state = f"{b.state / 2**10:,.0f} KiB" if b.state < 2**20 else mib(b.state)
            cells += [state, f"[{'green' if row.fits(arch) else 'red'}]{mib(b.total)}[/]"]
        table.add_row(*cells)
    console.print(table)
    for arch in archs:
        n = result.longest[arch]
        text = ("not bounded by memory (the state does not grow)" if n is None
                else "does not fit at all" if n == 0 else f"{n:,} tokens")
        console.print(f"longest context, {arch}: {text}")
    for line in result.assumptions:
        console.print(f"assumes {line}", highlight=False)


def bench(report) -> None:
    from samout_edge.bench import report as rep

    kind = (report.config.get("weights") or {}).get("kind") or "fp"
    head = rep.headers(report)
    table = Table(title=f"{', '.join(report.exports)} on {report.machine['label']} ({report.config['dtype']}, {kind} "
                        f"weights); ms: median latency; {head[6]}: against the first arch, above 1 = it is faster; "
                        "peak MB: memory; weights MiB: as stored")
    for header in head:
        table.add_column(header, justify="left" if header in ("backend", "mode", "arch", "weights MiB") else "right",
                         no_wrap=True)
    bandwidth = report.machine.get("memory_bandwidth")
    for row in rep.point_rows(report):
        lines = rep.table_rows(row)
        for i, (arch, cells) in enumerate(zip(row.records, lines)):
            cells = [escape(c) for c in cells]
            ratio = row.ratio(arch)
            if ratio is not None and i:
                cells[6] = f"[{'green' if ratio > 1 else 'red'}]{cells[6]}[/]"
            table.add_row(*cells, end_section=i == len(lines) - 1)
    console.print(table)
    if bandwidth:
        console.print(f"roofline: a decode step's bytes at {bandwidth['gb_per_s']:.1f} GB/s (the memory bandwidth: "
                      f"{bandwidth['method']}, {bandwidth['threads']} threads) over its measured time", highlight=False)


def bench_op(report) -> None:
    from samout_edge.bench.op import check_cell

    table = Table(title=escape(f"{report.title}, on {report.machine['label']} (median of interleaved runs)"))
    for header in ("candidate", "median ms", "GB/s", "fraction of copy", report.check_header):
        table.add_column(header, justify="left" if header == "candidate" else "right")
    for r in report.rows:
        cell = check_cell(report, r)
        color = "green" if r.exact else "red"
        table.add_row(escape(r.name), f"{r.median_ms:.3f}", f"{r.gb_per_s:.1f}", f"{r.fraction_of_copy:.3f}",
                      cell if r.exact is None else f"[{color}]{escape(cell)}[/]")
    console.print(table)


def short_runner(name: str) -> str:
    """ort:CPUExecutionProvider -> ort:CPU: the table has many columns to fit."""
    return name.replace("ExecutionProvider", "")


def shortest_names(paths: list[str]) -> dict[str, str]:
    """Each path by its last component, or whole where two share one (the table stays narrow)."""
    names = [Path(p).name or p for p in paths]
    return {p: n if names.count(n) == 1 else p for p, n in zip(paths, names)}


def evaluation(results, text) -> None:
    """Quality next to cost: one row per target; then bits per byte by position in the context."""
    short_targets = shortest_names([r.target for r in results])
    table = Table(title=escape(f"eval on {text}: bits per byte (lower is better); top-1 agreement, mean KL (nats "
                               "per token) and max logit error vs PyTorch fp32 on the same contexts"))
    for col in ("target", "arch", "runner", "dtype", "weights", "context", "bits/byte", "cost vs fp32", "top-1 agree",
                "KL vs fp32", "max logit err", "weights MiB", "state", "ms/window"):
        table.add_column(col, justify="left" if col in ("target", "arch", "runner", "dtype", "weights") else "right")
    for r in results:
        agree = "-" if r.top1_agreement is None else f"{100 * r.top1_agreement:.2f}%"
        err = "-" if r.max_logit_error is None else f"{r.max_logit_error:.2e}"
        kl = "-" if r.kl_from_fp32 is None else f"{r.kl_from_fp32:.4f}"
        cost = "-" if r.cost_bits_per_byte is None else f"{r.cost_bits_per_byte:+.4f}"
        weights = "-" if r.weights_bytes is None else f"{r.weights_bytes / 2**20:.1f}"
        context = f"stream {r.window:,}" if r.mode == "stream" else f"{r.window:,}"
        speed = f"{r.window_ms:.1f}" if r.mode == "windows" else f"{r.window_ms:.0f}/1k tok"
        table.add_row(escape(short_targets[r.target]), r.arch, escape(short_runner(r.runner)), r.dtype, r.weights,
                      context, f"{r.bits_per_byte:.4f}", cost, agree, kl, err, weights,
                      human_bytes(r.state_bytes), speed)
    console.print(table)
    first = results[0]
    how = (f"windows of {first.window} every {first.stride}" if first.mode == "windows"
           else "the whole file as one context")
    console.print(f"{first.tokens:,} tokens ({first.bytes:,} bytes) scored; {how}; cost, agreement and KL over the "
                  f"first {first.compared_tokens:,} tokens; state is the decode state after the longest context",
                  highlight=False)
    spans = sorted({(b["from"], b["to"]) for r in results for b in r.by_position})
    if len(spans) > 1:
        by_pos = Table(title="bits per byte by position in the context (does more context help?)")
        by_pos.add_column("target")
        for start, end in spans:
            by_pos.add_column(f"{_k(start)}-{_k(end) if end else ''}", justify="right")
        for r in results:
            cells = {(b["from"], b["to"]): b for b in r.by_position}
            by_pos.add_row(escape(short_targets[r.target]), *[
                f"{cells[span]['bits_per_byte']:.4f}" if span in cells else "-" for span in spans])
        console.print(by_pos)


def _k(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


STYLES = ("o-", "s--", "^-.", "d:")  # one line style per arch, in ARCHS order


def save_position_plot(results, path) -> None:
    """Bits per byte against position in the context, one line per target (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    names = shortest_names([r.target for r in results])
    for r in results:
        pts = [b for b in r.by_position if b["bits_per_byte"] is not None]
        mids = [(b["from"] * (b["to"] or 4 * b["from"])) ** 0.5 for b in pts]  # geometric middle of each span
        ax.plot(mids, [b["bits_per_byte"] for b in pts], STYLES[ARCHS.index(r.arch) % len(STYLES)],
                label=f"{names[r.target]} ({r.arch}, {'stream' if r.mode == 'stream' else f'windows of {r.window}'})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the context, tokens")
    ax.set_ylabel("bits per byte")
    ax.set_title("Does more context help? Bits per byte by position")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    import io

    from samout_edge.artifact.files import write_bytes_atomic

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())