"""The samout-edge command line: parse, call the library, render with Rich.

Every command is one library call; errors the user can fix are SamoutError and
print as one line with a non-zero exit. ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from typer.core import TyperGroup

from samout_edge.cli import render
from samout_edge.cli.ui import console, err_console, human_bytes, print_json, progress_bar
from samout_edge.errors import SamoutError

app = typer.Typer(
    name="samout-edge",
    help="Export, verify, build and benchmark SamOut (cummax-attention) language models for edge GPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
_debug = {"on": False}


@app.callback()
def root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _debug["on"] = debug


def parse_int_list(text: str | None, option: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise SamoutError(f"{option} takes comma-separated integers, got {text!r}") from None


# --------------------------------------------------------------------------- init / export


@app.command()
def init(
    preset: str = typer.Option("seed", "--preset", help="Model size: seed (the article's) or tiny."),
    output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to create."),
    seed: int = typer.Option(0, help="Random seed for the initial weights."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
) -> None:
    """Write a randomly initialised checkpoint (config.json + model.safetensors)."""
    from samout_edge.artifact.config import preset as get_preset
    from samout_edge.models.checkpoint import random_checkpoint, save_checkpoint

    config = get_preset(preset)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not force:
        raise SamoutError(f"{output} exists; choose another -o, or pass --force to replace it")
    save_checkpoint(random_checkpoint(config, seed), output)
    console.print(f"wrote {output} ({preset}: {config.parameter_count():,} parameters)")


@app.command()
def export(
    checkpoint: Optional[Path] = typer.Argument(
        None, help="Checkpoint directory, or a state_dict file (.pt/.pth/.bin) saved from the seed code."
    ),
    preset: Optional[str] = typer.Option(None, "--preset", help="Export a randomly initialised preset instead."),
    output: Path = typer.Option(..., "-o", "--output", help="Artifact directory to write."),
    arch: str = typer.Option("cummax", help="cummax (SamOut) or softmax (the baseline)."),
    lowering: str = typer.Option("native", help="native (standard ONNX ops) or custom (CumMax node + fallback body)."),
    scan: str = typer.Option("auto", help="Scan the lowering uses: auto, blocked or doubling."),
    max_seq: int = typer.Option(2048, "--max-seq", help="Longest sequence the graph must be correct for."),
    dtype: str = typer.Option("fp32", help="fp32 or fp16 (a genuinely fp16 graph, LayerNorm kept in fp32)."),
    logits: str = typer.Option("last", help="last (decode, [batch,1,vocab]) or all ([batch,seq,vocab])."),
    opset: int = typer.Option(18, help="ONNX opset: 18 or newer; 17 for TensorRT 8.5/8.6 (JetPack 5, 6.0)."),
    decompose_layernorm: bool = typer.Option(
        False, "--decompose-layernorm", help="Write LayerNorm as mean/variance ops (TensorRT 8.5 has no LayerNormalization)."
    ),
    heads: Optional[int] = typer.Option(None, help="Head count for a bare state_dict (default 8)."),
    seed: int = typer.Option(0, help="Random seed for --preset weights."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the export against PyTorch."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT even if it is not an earlier export."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Export a checkpoint to a verified ONNX artifact directory (model.onnx + export.json)."""
    from samout_edge.exporter.onnx_export import ExportOptions
    from samout_edge.exporter.onnx_export import export as run_export

    options = ExportOptions(
        arch=arch, lowering=lowering, scan=scan, max_seq=max_seq, dtype=dtype, logits=logits, opset=opset,
        decompose_layernorm=decompose_layernorm,
    )
    with progress_bar(not json_out) as progress:
        result = run_export(
            output, options, checkpoint=checkpoint, preset_name=preset, heads=heads, seed=seed,
            run_verify=verify, force=force, progress=progress,
        )
    m = result.manifest
    if json_out:
        print_json({"directory": str(result.directory), "seconds": result.seconds, "model_bytes": result.model_bytes,
                    "timings": result.timings, "manifest": m.to_dict()})
    else:
        console.print(
            f"exported [bold]{m.arch}[/] ({m.dtype}, {m.lowering}/{m.scan['scan']}, max_seq {m.max_seq}) "
            f"to {result.directory}: model.onnx {human_bytes(result.model_bytes)} in {result.seconds:.1f} s"
        )
        if result.verification is not None:
            render.verification(result.verification)
    if result.verification is not None and not result.verification.passed:
        raise SamoutError(f"verification failed; the export is in {result.directory} for inspection")


@app.command()
def verify(
    directory: Path = typer.Argument(..., help="Export directory."),
    checkpoint: Optional[Path] = typer.Option(None, help="Recompute with PyTorch from this source checkpoint (needs torch)."),
    provider: str = typer.Option("cpu", help="ONNX Runtime provider: cpu, cuda, tensorrt or a full name."),
    lengths: Optional[str] = typer.Option(None, help="Recompute with PyTorch at these lengths, e.g. 1,1000,4096 (needs torch)."),
    engine: Optional[str] = typer.Option(None, help="Verify the TensorRT engine built for this profile instead."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check an export (or its engine: DIR/engines/PROFILE) against its golden PyTorch outputs; exits 1 on failure.

    Needs no torch. --lengths or --checkpoint recompute the reference with PyTorch instead."""
    from samout_edge.runtime.verify import verify as run_verify

    with progress_bar(not json_out) as progress:
        result = run_verify(directory, provider, parse_int_list(lengths, "--lengths"), engine, checkpoint, progress=progress)
    if json_out:
        print_json(result.to_dict())
    else:
        render.verification(result)
    if not result.passed:
        raise SamoutError("verification failed")


# --------------------------------------------------------------------------- inspect / doctor


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="Export directory or .onnx file."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Show an export's inputs, outputs, ops, weights and custom nodes."""
    from samout_edge.inspection import inspect_path

    result = inspect_path(path)
    if json_out:
        print_json(result.to_dict())
        return
    render.inspect(result)



@app.command()
def doctor(json_out: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
    """Report what this machine offers: Python, torch, ONNX Runtime providers, GPU, TensorRT, Jetson."""
    from samout_edge.doctor import collect

    report = collect()
    if json_out:
        print_json(report)
        return
    render.doctor(report)



# --------------------------------------------------------------------------- profiles / build / plan

profiles_app = typer.Typer(help="Device profiles: what each target offers and how engines for it are built.",
                           no_args_is_help=True, rich_markup_mode=None)
app.add_typer(profiles_app, name="profiles")


@profiles_app.command("list")
def profiles_list(json_out: bool = typer.Option(False, "--json", help="Print the profiles as JSON.")) -> None:
    """The shipped device profiles."""
    from samout_edge.profiles import list_profiles

    profiles = list_profiles()
    if json_out:
        print_json([p.to_dict() for p in profiles])
        return
    render.profiles(profiles)



@profiles_app.command("show")
def profiles_show(
    name: str = typer.Argument(..., help="A shipped profile name, or a FILE.toml."),
    json_out: bool = typer.Option(False, "--json", help="Print the profile as JSON."),
) -> None:
    """One profile in full."""
    from samout_edge.profiles import load_profile

    profile = load_profile(name)
    data = profile.to_dict()
    if json_out:
        print_json(data)
        return
    render.profile(profile, data)



@app.command()
def build(
    directory: Path = typer.Argument(..., help="Export directory."),
    profile: str = typer.Option(..., "--profile", help="Device profile name, or a FILE.toml."),
    precision: Optional[str] = typer.Option(None, help="fp16 or fp32 (default: the profile's)."),
    dla_core: Optional[int] = typer.Option(None, "--dla-core", help="Run on this DLA core, GPU fallback on (profiles with DLA)."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="Timing cache file, reused across builds."),
    tensorrt: Optional[str] = typer.Option(None, help="Plan for this TensorRT version (default: the installed one, else the profile's)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the build plan and the trtexec line; build nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan or result as JSON."),
) -> None:
    """Build a TensorRT engine for a device profile: DIR/engines/PROFILE/model.engine + engine.json."""
    from samout_edge.profiles import load_profile
    from samout_edge.tensorrt.plan import make_plan

    plan = make_plan(directory, load_profile(profile), tensorrt, precision, dla_core, timing_cache)
    if dry_run:
        if json_out:
            print_json(plan.to_dict())
        else:
            render.build_plan(plan)
        return
    from samout_edge.tensorrt.build import build_engine

    with progress_bar(not json_out) as progress:
        result = build_engine(plan, progress)
    if json_out:
        print_json({"engine": str(result.engine), "seconds": result.seconds, "bytes": result.engine_bytes, **result.meta})
    else:
        console.print(f"built {result.engine} ({human_bytes(result.engine_bytes)}) in {result.seconds:.0f} s "
                      f"with TensorRT {result.meta['tensorrt']} on {result.meta['gpu']}")


@app.command()
def plan(
    target: Optional[Path] = typer.Argument(None, help="Export directory (default: --preset)."),
    profile: str = typer.Option(..., "--profile", help="Device profile name, or a FILE.toml."),
    preset: str = typer.Option("seed", help="Model size when no DIR is given."),
    dtype: Optional[str] = typer.Option(None, help="fp16 or fp32 (default: the export's, else the profile's)."),
    batch: int = typer.Option(1, help="Batch size."),
    contexts: Optional[str] = typer.Option(None, help="Context lengths to tabulate (default 1k..1M)."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Memory plan on a device: weights + activations + cummax state vs KV cache, and the longest context."""
    from samout_edge.artifact.config import preset as get_preset
    from samout_edge.profiles import load_profile
    from samout_edge.profiles.memory import memory_plan

    device = load_profile(profile)
    if target is not None:
        from samout_edge.artifact.manifest import read_manifest

        manifest = read_manifest(target)
        config, dtype = manifest.config, dtype or manifest.dtype
    else:
        config = get_preset(preset)
    if dtype not in (None, "fp16", "fp32"):
        raise SamoutError(f"--dtype must be fp16 or fp32, got {dtype!r}")
    if batch < 1:
        raise SamoutError(f"--batch must be at least 1, got {batch}")
    result = memory_plan(config, device, dtype, batch, parse_int_list(contexts, "--contexts"))
    if json_out:
        print_json(result.to_dict())
        return
    render.memory_plan(result, device, config, batch)



# --------------------------------------------------------------------------- generate


@app.command()
def generate(
    target: Path = typer.Argument(..., help="Export directory, or a checkpoint (torch backend)."),
    ids: Optional[str] = typer.Option(None, help="Prompt token ids, e.g. 1,2,3."),
    prompt: Optional[str] = typer.Option(None, help="Prompt text (needs --vocab)."),
    vocab: Optional[Path] = typer.Option(None, help="JSON list of token strings: id i is the i-th string."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens to generate."),
    backend: str = typer.Option("auto", help="auto (ort for an export, torch for a checkpoint), torch or ort."),
    provider: str = typer.Option("cpu", help="ONNX Runtime provider."),
    device: str = typer.Option("auto", help="torch device."),
    engine: Optional[str] = typer.Option(None, help="Run the TensorRT engine built for this profile."),
    arch: str = typer.Option("cummax", help="For a checkpoint: cummax or softmax."),
    heads: Optional[int] = typer.Option(None, help="Head count of a bare state_dict (default 8)."),
    temperature: float = typer.Option(0.0, help="0 is greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the k most likely tokens (0: all)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON instead of streaming."),
) -> None:
    """Generate tokens: one prefill call, then one-token decode calls carrying the state."""
    from samout_edge.artifact.config import check_arch
    from samout_edge.artifact.manifest import is_export_dir
    from samout_edge.generate import Sampler, load_generation_runner, parse_prompt, vocab_for
    from samout_edge.generate import generate as run_generate

    check_arch(arch)
    if engine:
        backend, provider = "tensorrt", engine
    elif backend == "auto":
        backend = "ort" if is_export_dir(target) else "torch"
    runner = load_generation_runner(target, backend, provider, device, arch, heads)
    words = vocab_for(vocab, runner.info.config.vocab_size)
    prompt_ids = parse_prompt(ids, prompt, words)
    sampler = Sampler(temperature, top_k, seed)

    def show(token: int) -> None:
        sys.stdout.write(words.decode(token) if words else f"{token} ")
        sys.stdout.flush()

    result = run_generate(runner, prompt_ids, max_new_tokens, sampler, None if json_out else show)
    stats = (f"{runner.name} {runner.info.arch}: prefill {len(result.prompt_ids)} tokens in {result.prefill_s * 1e3:.1f} ms "
             f"({result.prefill_tokens_per_s:,.0f} tok/s), decode {result.decode_tokens_per_s:,.1f} tok/s")
    if json_out:
        print_json({"prompt_ids": result.prompt_ids, "new_ids": result.new_ids,
                    "text": "".join(words.decode(t) for t in result.new_ids) if words else None,
                    "prefill_ms": result.prefill_s * 1e3, "prefill_tokens_per_s": result.prefill_tokens_per_s,
                    "decode_tokens_per_s": result.decode_tokens_per_s, "runner": runner.name, "arch": runner.info.arch})
    else:
        sys.stdout.write("\n")
        err_console.print(stats, highlight=False)


# --------------------------------------------------------------------------- bench


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


@bench_app.command("run")
def bench_run(
    dirs: Optional[list[Path]] = typer.Argument(None, help="Export directories: one (its counterpart is exported) or one per arch."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Bench a randomly initialised preset instead (exported first)."),
    mode: str = typer.Option("prefill,decode", help="Scenarios: prefill, decode or both."),
    seq: str = typer.Option("256,1024,4096", help="Prefill sequence lengths."),
    context: str = typer.Option("256,1024,4096", help="Decode: tokens already in the state."),
    batch: str = typer.Option("1", help="Batch sizes."),
    backend: str = typer.Option("torch,ort", help="Backends: torch (eager) and/or ort (every available provider)."),
    provider: Optional[str] = typer.Option(None, help="ONNX Runtime providers to use (default: all available)."),
    device: str = typer.Option("auto", help="torch device: auto (cuda when present), cpu or cuda."),
    engine: Optional[str] = typer.Option(None, help="Also bench the TensorRT engines built for this profile."),
    dtype: str = typer.Option("fp32", help="With --preset: fp32 or fp16."),
    lowering: str = typer.Option("native", help="With --preset: native or custom."),
    scan: str = typer.Option("auto", help="With --preset: the lowering's scan (auto, blocked, doubling)."),
    fast_kernel: bool = typer.Option(True, "--fast-kernel/--no-fast-kernel",
                                     help="torch on CUDA: the Triton cummax (default) or torch.cummax."),
    work: Optional[Path] = typer.Option(None, help="Where to keep exports made for the bench (default: a temporary directory)."),
    warmup: int = typer.Option(2, help="Untimed calls per series."),
    repeats: int = typer.Option(20, help="Most timed calls per series."),
    min_repeats: int = typer.Option(3, "--min-repeats", help="Fewest timed calls per series."),
    budget: float = typer.Option(3.0, help="Seconds per series after which timing stops (once --min-repeats are done)."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure peak memory (a child process per scenario)."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write one record per measurement to this JSON file."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write latency and memory plots to this PNG."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write the table to this Markdown file."),
) -> None:
    """Latency and memory of SamOut vs the softmax baseline: prefill and decode, side by side."""
    from samout_edge.artifact.engine import is_engine_dir
    from samout_edge.bench import report as rep
    from samout_edge.bench.suite import BenchConfig, prepare_exports, run_bench
    from samout_edge.bench.timing import Budget

    dirs = list(dirs or [])
    engine_dirs = [d for d in dirs if is_engine_dir(d)]
    if engine_dirs:  # DIR/engines/PROFILE: bench that engine, on the tensorrt backend
        engine = engine or engine_dirs[0].name
        dirs = [d.parent.parent if is_engine_dir(d) else d for d in dirs]
        backend = "tensorrt"
    if engine and "tensorrt" not in backend:
        backend += ",tensorrt"
    config = BenchConfig(
        modes=[m.strip() for m in mode.split(",") if m.strip()],
        seqs=parse_int_list(seq, "--seq"),
        contexts=parse_int_list(context, "--context"),
        batches=parse_int_list(batch, "--batch"),
        backends=[b.strip() for b in backend.split(",") if b.strip()],
        providers=[p.strip() for p in provider.split(",")] if provider else None,
        device=device,
        engine=engine,
        fast_kernel=fast_kernel,
        budget=Budget(warmup=warmup, min_repeats=min_repeats, max_repeats=repeats, seconds=budget),
        memory=memory,
    ).validate()
    for path, suffix in ((json_file, ".json"), (plot, ".png"), (markdown, ".md")):
        if path is not None and path.suffix.lower() != suffix:
            raise SamoutError(f"{path} should end in {suffix}")
    with progress_bar() as progress:
        pair = prepare_exports(dirs, preset, work, config.max_seq_needed(), dtype, lowering, progress, scan)
        report = run_bench(pair, config, progress)
    render.bench(report)
    if json_file:
        rep.save_json(report, json_file)
        console.print(f"wrote {json_file} ({len(report.records)} records)")
    if markdown:
        rep.save_markdown(report, markdown)
        console.print(f"wrote {markdown}")
    if plot:
        rep.save_plot(report, plot)
        console.print(f"wrote {plot}")


@bench_app.command("op")
def bench_op_command(
    shape: str = typer.Option("1,8,8192,64", help="Tensor shape [batch, heads, seq, head_dim]."),
    dtype: str = typer.Option("fp32", help="fp32 or fp16."),
    axis: int = typer.Option(2, help="Scan axis (2: sequence, 1: heads)."),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="Unroll the lowerings for this length (an export's max_seq); default: the axis length."),
    device: str = typer.Option("auto", help="torch device for torch.cummax and the copy: auto, cpu or cuda."),
    repeats: int = typer.Option(30, help="Most timed calls per candidate."),
    budget: float = typer.Option(2.0, help="Seconds per candidate after which timing stops."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the results to this JSON file."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write the table to this Markdown file."),
) -> None:
    """The cummax op alone: torch.cummax vs each ONNX lowering in ONNX Runtime vs a plain copy."""
    from samout_edge.artifact.files import write_bytes_atomic, write_json_atomic
    from samout_edge.bench.op import bench_op, to_markdown
    from samout_edge.bench.timing import Budget

    dims = parse_int_list(shape, "--shape")
    with progress_bar() as progress:
        report = bench_op(dims, dtype, axis, max_len, budget=Budget(2, min(5, repeats), repeats, budget),
                          device=device, progress=progress)
    render.bench_op(report, dims, dtype, axis)
    if json_file:
        write_json_atomic(json_file, report.to_dict())
        console.print(f"wrote {json_file}")
    if markdown:
        write_bytes_atomic(markdown, to_markdown(report).encode())
        console.print(f"wrote {markdown}")


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """Entry point: Typer reports usage errors itself (exit 2); SamoutError becomes one line."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        app(args=args, prog_name="samout-edge")
    except SamoutError as e:
        if debug:
            traceback.print_exc()
        err_console.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        err_console.print(
            f"[red]error:[/] unexpected {type(e).__name__}: {escape(first_line)} (rerun with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
