"""Commands that run a model: generate, bench (and bench op) and eval."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from typer.core import TyperGroup

from samout_edge.artifact.arch import ARCH_HELP, ARCH_LIST_HELP
from samout_edge.artifact.graph import PREFILL_UBATCH
from samout_edge.cli import render
from samout_edge.cli.backend_options import backend_options
from samout_edge.cli.common import (
    UBATCH_HELP,
    WINDOW_HELP,
    DType,
    Lowering,
    Preset,
    Scan,
    TorchDevice,
    app,
    arch_of,
    parse_choice_list,
    parse_int_list,
    value,
)
from samout_edge.cli.ui import console, err_console, print_json, progress_bar
from samout_edge.errors import SamoutError, install_hint, require_torch
from samout_edge.runtime.registry import Settings


@app.command()
@backend_options()
def generate(
    target: Path = typer.Argument(..., help="Export directory, or a checkpoint (torch backend)."),
    ids: Optional[str] = typer.Option(None, help="Prompt token ids, e.g. 1,2,3."),
    prompt: Optional[str] = typer.Option(None, help="Prompt text (needs --vocab)."),
    vocab: Optional[Path] = typer.Option(None, help="JSON list of token strings (id i is the i-th), or 'bytes' (UTF-8 bytes: id b is byte b) [default: the export's]."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens to generate."),
    backend: str = "auto",
    settings: Optional[Settings] = None,
    arch: str = typer.Option("cummax", help="For a checkpoint: " + ARCH_HELP),
    softmax_window: int = typer.Option(0, "--softmax-window", min=0, help="For a checkpoint: " + WINDOW_HELP),
    heads: Optional[int] = typer.Option(None, help="Head count of a bare state_dict (default 8)."),
    temperature: float = typer.Option(0.0, help="0 is greedy."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample from the k most likely tokens (0: all)."),
    seed: int = typer.Option(0, min=0, max=2**63 - 1, help="Sampling seed."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON instead of streaming."),
    ubatch: int = typer.Option(PREFILL_UBATCH, "--ubatch", min=0, help=UBATCH_HELP),
) -> None:
    """Generate tokens: a prefill (in calls of --ubatch tokens), then one-token decode calls carrying the state."""
    from samout_edge.generate import Sampler, parse_prompt, vocab_for
    from samout_edge.generate import generate as run_generate
    from samout_edge.runtime.target import engine_of, open_runner, resolve_target

    resolved = resolve_target(target, engine_of(settings))
    runner = open_runner(resolved, backend, settings, arch_of(arch, softmax_window), heads, ubatch=ubatch)
    words = vocab_for(vocab, runner.info.config.vocab_size, resolved.export_dir)
    prompt_ids = parse_prompt(ids, prompt, words)
    sampler = Sampler(temperature, top_k, seed)
    piece = words.stream() if words else None  # whole characters only: a UTF-8 byte vocab's are incremental

    def show(token: int) -> None:
        sys.stdout.write(piece(token) if words else f"{token} ")
        sys.stdout.flush()

    result = run_generate(runner, prompt_ids, max_new_tokens, sampler, None if json_out else show)
    stats = (f"{runner.name} {runner.info.arch}: prefill {len(result.prompt_ids)} tokens in {result.prefill_s * 1e3:.1f} ms "
             f"({result.prefill_tokens_per_s:,.0f} tok/s), decode {result.decode_tokens_per_s:,.1f} tok/s")
    if json_out:
        print_json({"prompt_ids": result.prompt_ids, "new_ids": result.new_ids,
                    "text": words.decode_ids(result.new_ids) if words else None,
                    "prefill_ms": result.prefill_s * 1e3, "prefill_tokens_per_s": result.prefill_tokens_per_s,
                    "decode_tokens_per_s": result.decode_tokens_per_s, "runner": runner.name, "arch": runner.info.arch})
    else:
        sys.stdout.write("\n")
        err_console.print(stats, highlight=False)


class DefaultCommandGroup(TyperGroup):
    """`bench ARGS` means `bench run ARGS` unless ARGS start with a subcommand name."""

    default_command = "run"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args.insert(0, self.default_command)
        elif not args:
            args.insert(0, self.default_command)
        return super().parse_args(ctx, args)


bench_app = typer.Typer(
    cls=DefaultCommandGroup,
    help="Benchmark SamOut against the softmax baseline (`bench run`, the default) or the cummax op alone (`bench op`).",
    rich_markup_mode=None,
)
app.add_typer(bench_app, name="bench")


BENCH_HELPS = {
    "provider": "ONNX Runtime providers to use, comma-separated (default: all available).",
    "device": "torch device: auto (cuda when present), cpu or cuda.",
    "engine": "Also bench the TensorRT engines built for this profile.",
    "spinning": "ONNX Runtime CPU: let threads busy-wait between operators (ORT's own default). Off by default: "
                "with two sessions interleaved, one's spinning threads slow the other's calls, softmax's more "
                "than cummax's.",
}


@bench_app.command("run")
@backend_options(choose="many", defaults={"provider": None, "spinning": False}, helps=BENCH_HELPS)
def bench_run(
    dirs: Optional[list[Path]] = typer.Argument(None, help="Export directories: one per arch, or one (the other archs "
                                                "are exported from its checkpoint)."),
    preset: Optional[Preset] = typer.Option(None, "--preset", help="Bench a randomly initialised preset instead (exported first)."),
    archs: Optional[str] = typer.Option(None, "--archs", help="Archs side by side, the first the one the others are "
                                        f"measured against: {ARCH_LIST_HELP} (default: the exports given, two or "
                                        "more; else cummax,softmax)."),
    mode: str = typer.Option("prefill,decode", help="Scenarios: prefill, decode or both."),
    seq: str = typer.Option("256,1024,4096", help="Prefill sequence lengths."),
    context: str = typer.Option("256,1024,4096", help="Decode: tokens already in the state (any length: the prefill "
                                "before it is fed in chunks)."),
    batch: str = typer.Option("1", help="Batch sizes."),
    backend: str = "torch,ort",
    settings: Optional[Settings] = None,
    dtype: DType = typer.Option("fp32", help="With --preset: fp32 or fp16."),
    lowering: Lowering = typer.Option("native", help="With --preset: native or custom."),
    scan: Scan = typer.Option("auto", help="With --preset: the lowering's scan (auto, blocked, doubling)."),
    work: Optional[Path] = typer.Option(None, help="Where to keep exports made for the bench (default: a temporary directory)."),
    warmup: int = typer.Option(2, min=0, help="Untimed calls per series."),
    repeats: int = typer.Option(20, min=1, help="Most timed calls per series."),
    min_repeats: int = typer.Option(3, "--min-repeats", min=1, help="Fewest timed calls per series."),
    budget: float = typer.Option(3.0, help="Seconds per series after which timing stops (once --min-repeats are done)."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure peak memory (a child process per scenario)."),
    kv_budget: Optional[float] = typer.Option(None, "--kv-budget", min=0,
                                              help="MiB: softmax contexts whose KV cache would pass this are reported "
                                              "as such, not run (always: those past the machine's memory)."),
    ubatch: int = typer.Option(PREFILL_UBATCH, "--ubatch", min=0, help=UBATCH_HELP),
    roofline: bool = typer.Option(True, "--roofline/--no-roofline",
                                  help="Measure the memory bandwidth (about a second) and give each decode row the "
                                  "fraction of it the step reaches."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write one record per measurement to this JSON file."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write latency and memory plots to this PNG."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write the table to this Markdown file."),
) -> None:
    """Latency and memory of SamOut vs the softmax baseline (or any set of archs): prefill and decode, side by side."""
    from samout_edge.artifact.manifest import BENCH_ARCHS
    from samout_edge.bench.suite import MODES, BenchConfig, bench_workspace, check_exports, run_bench
    from samout_edge.bench.timing import Budget
    from samout_edge.runtime.target import resolve_target

    settings, backends = _bench_backends(dirs or [], backend, settings)
    config = BenchConfig(
        modes=parse_choice_list(mode, "--mode", MODES),
        seqs=parse_int_list(seq, "--seq"),
        contexts=parse_int_list(context, "--context"),
        batches=parse_int_list(batch, "--batch"),
        backends=backends,
        settings=settings,
        budget=Budget(warmup=warmup, min_repeats=min_repeats, max_repeats=repeats, seconds=budget),
        memory=memory,
        kv_budget_bytes=None if kv_budget is None else int(kv_budget * 2**20),
        roofline=roofline,
        ubatch=ubatch or None,
    ).validate()
    resolved = [resolve_target(d) for d in dirs or []]  # after the options: a bad choice is a usage error first
    if any(t.kind == "checkpoint" for t in resolved):
        raise SamoutError("bench takes exports (or engine directories), or --preset; export the checkpoint first")
    dirs = [t.export_dir for t in resolved]
    _check_outputs({"--json": json_file, "--plot": plot, "--markdown": markdown})
    given = check_exports(dirs, None) if dirs else {}
    wanted = _bench_archs(archs) or (list(given) if len(given) > 1 else list(BENCH_ARCHS))
    with progress_bar() as progress, bench_workspace(work) as work_dir:
        if preset or any(a not in given for a in wanted):  # the other archs are exported from the same checkpoint
            require_torch("bench with --preset or one export (it exports the other archs); give one export per arch")
            from samout_edge.exporter.counterparts import prepare_exports

            pair = prepare_exports(dirs, value(preset), work_dir, config.export_max_seq(), dtype.value,
                                   lowering.value, progress, scan.value, wanted)
        else:
            pair = check_exports([given[a] for a in wanted], wanted)
        report = run_bench(pair, config, progress)
    render.bench(report)
    _write_outputs(report, json_file, markdown, plot)


def _bench_archs(archs: str | None) -> list[str] | None:
    """--archs by their full names (None: not given), each once."""
    from samout_edge.artifact.arch import arch_spec

    wanted = [arch_spec(a.strip()).name for a in archs.split(",") if a.strip()] if archs else None
    if wanted is not None and len(set(wanted)) < len(wanted):
        raise SamoutError(f"--archs names an arch twice: {archs}")
    return wanted


def _bench_backends(dirs: list[Path], backend: str, settings: Settings) -> tuple[Settings, list[str]]:
    """--backend's list, and an engine to bench: an engine directory given (DIR/engines/PROFILE:
    that engine, on the backend that runs engines only), or --engine (that backend added)."""
    from samout_edge.artifact.engine import is_engine_dir
    from samout_edge.runtime.registry import BACKENDS
    from samout_edge.runtime.target import backends_for, engine_of

    runs_engines = backends_for("engine")
    engine_dirs = [d for d in dirs if is_engine_dir(d)]
    if engine_dirs:
        settings = settings.replace(engine=engine_of(settings) or engine_dirs[0].name)
        backend = runs_engines[0]
    backends = parse_choice_list(backend, "--backend", tuple(BACKENDS))
    if engine_of(settings) and not set(backends) & set(runs_engines):
        backends.append(runs_engines[0])
    return settings, backends


def _check_outputs(paths: dict[str, Path | None]) -> None:
    """--json, --plot and --markdown: the right suffix, writable, and matplotlib for a plot, before minutes of bench."""
    from samout_edge.artifact.files import check_writable_file

    suffixes = {"--json": ".json", "--plot": ".png", "--markdown": ".md"}
    if paths.get("--plot") is not None and importlib.util.find_spec("matplotlib") is None:
        raise SamoutError(f"--plot needs matplotlib: {install_hint('plot')}")
    for option, path in paths.items():
        if path is not None and path.suffix.lower() != suffixes[option]:
            raise SamoutError(f"{path} should end in {suffixes[option]}")
    for option, path in paths.items():
        if path is not None:
            check_writable_file(path, option)


def _write_outputs(report, json_file: Path | None, markdown: Path | None, plot: Path | None) -> None:
    from samout_edge.bench import report as rep

    if json_file:
        rep.save_json(report, json_file)
        console.print(escape(f"wrote {json_file} ({len(report.records)} records)"), highlight=False)
    if markdown:
        rep.save_markdown(report, markdown)
        console.print(escape(f"wrote {markdown}"), highlight=False)
    if plot:
        rep.save_plot(report, plot)
        console.print(escape(f"wrote {plot}"), highlight=False)


@bench_app.command("op")
def bench_op_command(
    shape: str = typer.Option("1,8,8192,64", help="Tensor shape [batch, heads, seq, head_dim]."),
    dtype: DType = typer.Option("fp32", help="fp32 or fp16."),
    axis: int = typer.Option(2, help="Scan axis (2: sequence, 1: heads)."),
    scan: str = typer.Option("max", help="The scan: max (cummax, checked bit for bit) or linear (h = a*h + b, "
                             "checked against a float64 loop at its tolerance; axis 2 of a 4-d shape)."),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="Unroll the lowerings for this length (an export's max_seq); default: the axis length."),
    device: TorchDevice = typer.Option("auto", help="torch device for torch.cummax and the copy: auto, cpu or cuda."),
    repeats: int = typer.Option(30, min=1, help="Most timed calls per candidate."),
    budget: float = typer.Option(2.0, help="Seconds per candidate after which timing stops."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the results to this JSON file."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write the table to this Markdown file."),
) -> None:
    """A scan op alone: torch (cummax, or our eager linear scan) vs each ONNX lowering in ONNX Runtime vs a plain copy."""
    from samout_edge.artifact.files import check_writable_file, write_bytes_atomic, write_json_atomic
    require_torch("bench op (torch.cummax and the copy are its yardsticks)")
    from samout_edge.bench.op import bench_op, to_markdown
    from samout_edge.bench.timing import Budget

    for path, option in ((json_file, "--json"), (markdown, "--markdown")):
        if path is not None:
            check_writable_file(path, option)
    dims = parse_int_list(shape, "--shape")
    with progress_bar() as progress:
        report = bench_op(dims, dtype.value, axis, max_len, budget=Budget(2, min(5, repeats), repeats, budget),
                          device=device.value, progress=progress, scan=scan)
    render.bench_op(report)
    if json_file:
        write_json_atomic(json_file, report.to_dict())
        console.print(escape(f"wrote {json_file}"), highlight=False)
    if markdown:
        write_bytes_atomic(markdown, to_markdown(report).encode())
        console.print(escape(f"wrote {markdown}"), highlight=False)


MAX_EVAL_TARGETS = 16


@app.command("eval")
@backend_options()
def eval_command(
    targets: list[Path] = typer.Argument(..., help="Exports (--logits all), engine dirs or checkpoints: one row each."),
    text: Path = typer.Option(..., "--text", help="A UTF-8 text file to score."),
    backend: str = "auto",
    settings: Optional[Settings] = None,
    window: Optional[int] = typer.Option(None, min=2, help="Tokens per window (default 512; past an export's max_seq "
                                          "it is fed in chunks, the state carried)."),
    stride: Optional[int] = typer.Option(None, min=1, help="Tokens between window starts (default window-1: each token computed once)."),
    vocab: Optional[Path] = typer.Option(None, help="Vocab file (JSON list of token strings), or 'bytes' [default: the export's, else UTF-8 bytes as ids]."),
    reference: bool = typer.Option(True, "--reference/--no-reference",
                                   help="Also compare with PyTorch fp32 (top-1 agreement, max logit error; needs torch)."),
    ubatch: int = typer.Option(PREFILL_UBATCH, "--ubatch", min=0, help=UBATCH_HELP),
    arch: str = typer.Option("cummax", help="For a checkpoint: " + ARCH_HELP),
    softmax_window: int = typer.Option(0, "--softmax-window", min=0, help="For a checkpoint: " + WINDOW_HELP),
    heads: Optional[int] = typer.Option(None, help="Head count of a bare state_dict (default 8)."),
    checkpoint: Optional[Path] = typer.Option(
        None, help="A copy of the exports' source checkpoint, where it has moved (the PyTorch reference runs it)."),
    stream: bool = typer.Option(False, "--stream", help="Score the whole file as one context, read a piece at a "
                                "time with the state carried (memory stays flat; softmax: while its KV cache fits)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write bits per byte by position in the context to this PNG."),
    record: bool = typer.Option(False, "--record", help="Keep each export's result in its export.json (quality): "
                                "what its precision costs on this text travels with it; inspect shows it."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Quality on the deployed artifact: bits per byte (overall and by position in the context), perplexity,
    agreement with PyTorch fp32; targets side by side."""
    from samout_edge.artifact.files import check_writable_file
    from samout_edge.evaluate import eval_target, record_quality
    from samout_edge.runtime.target import engine_of, resolve_target

    engine = engine_of(settings)
    if len(targets) > MAX_EVAL_TARGETS:
        raise SamoutError(f"give at most {MAX_EVAL_TARGETS} targets")
    resolved = [resolve_target(target, engine) for target in targets]  # a wrong path fails before minutes of scoring
    for found in resolved if record else []:
        if found.kind != "export":
            raise SamoutError(f"--record keeps a result in an export's export.json; {found.path} is a {found.kind}")
    if plot is not None:
        if importlib.util.find_spec("matplotlib") is None:
            raise SamoutError(f"--plot needs matplotlib: {install_hint('plot')}")
        if plot.suffix.lower() != ".png":
            raise SamoutError(f"{plot} should end in .png")
        check_writable_file(plot, "--plot")
    results = []
    with progress_bar(not json_out) as progress:
        for target in targets:
            results.append(eval_target(target, text, backend, window=window, stride=stride, vocab=vocab,
                                       with_reference=reference, arch=arch_of(arch, softmax_window), heads=heads,
                                       progress=progress, checkpoint=checkpoint, stream=stream, settings=settings,
                                       ubatch=ubatch))
    if record:
        for found, result in zip(resolved, results):
            record_quality(found.export_dir, result, text)
    if json_out:
        print_json([r.to_dict() for r in results])
    else:
        render.evaluation(results, text)
    if plot is not None:
        render.save_position_plot(results, plot)
        if not json_out:
            console.print(escape(f"wrote {plot}"), highlight=False)
