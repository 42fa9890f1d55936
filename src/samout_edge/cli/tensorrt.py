"""Commands for a device: profiles, TensorRT engine builds and memory plans."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from samout_edge.cli import render
from samout_edge.cli.common import DType, Precision, Preset, app, parse_int_list, value
from samout_edge.cli.ui import console, human_bytes, print_json, progress_bar
from samout_edge.errors import SamoutError

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
    precision: Optional[Precision] = typer.Option(None, help="fp16 or fp32 (default: the profile's)."),
    dla_core: Optional[int] = typer.Option(None, "--dla-core", help="Run on this DLA core, GPU fallback on (profiles with DLA)."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="Timing cache file, reused across builds."),
    tensorrt: Optional[str] = typer.Option(None, help="Plan for this TensorRT version (default: the installed one, else the profile's)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the build plan and the trtexec line; build nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan or result as JSON."),
) -> None:
    """Build a TensorRT engine for a device profile: DIR/engines/PROFILE/model.engine + engine.json."""
    from samout_edge.profiles import load_profile
    from samout_edge.tensorrt.plan import make_plan

    plan = make_plan(directory, load_profile(profile), tensorrt, value(precision), dla_core, timing_cache)
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
        console.print(escape(f"built {result.engine} ({human_bytes(result.engine_bytes)}) in {result.seconds:.0f} s "
                             f"with TensorRT {result.meta['tensorrt']} on {result.meta['gpu']}"), highlight=False)
        for note in result.notes:
            console.print(f"note: {escape(note)}", highlight=False)


@app.command()
def plan(
    target: Optional[Path] = typer.Argument(None, help="Export directory (default: --preset)."),
    profile: str = typer.Option(..., "--profile", help="Device profile name, or a FILE.toml."),
    preset: Preset = typer.Option("seed", help="Model size when no DIR is given."),
    dtype: Optional[DType] = typer.Option(None, help="fp16 or fp32 (default: the export's, else the profile's)."),
    batch: int = typer.Option(1, help="Batch size."),
    contexts: Optional[str] = typer.Option(None, help="Context lengths to tabulate (default 1k..1M)."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Memory plan on a device: weights + activations + cummax state vs KV cache, and the longest context."""
    from samout_edge.artifact.config import preset as get_preset
    from samout_edge.profiles import load_profile
    from samout_edge.profiles.memory import export_weights, memory_plan

    device = load_profile(profile)
    weights_bytes, weights_kind = None, "fp"
    if target is not None:
        from samout_edge.artifact.manifest import read_manifest

        manifest = read_manifest(target)
        config, dtype_name = manifest.config, value(dtype) or manifest.dtype
        # the export's weights as stored (int8/int4 with their scales), where they hold for this dtype
        weights_bytes, weights_kind = export_weights(manifest, dtype_name)
    else:
        config, dtype_name = get_preset(preset.value), value(dtype)
    if batch < 1:
        raise SamoutError(f"--batch must be at least 1, got {batch}")
    result = memory_plan(config, device, dtype_name, batch, parse_int_list(contexts, "--contexts"),
                         weights_bytes=weights_bytes, weights_kind=weights_kind)
    if json_out:
        print_json(result.to_dict())
        return
    render.memory_plan(result, device, config, batch)
