"""Commands about a device: its profiles, and whether a model fits it (`plan`: a memory estimate
per context; nothing here needs TensorRT)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from samout_edge.artifact.arch import ARCH_LIST_HELP
from samout_edge.artifact.graph import PREFILL_UBATCH
from samout_edge.cli import render
from samout_edge.cli.common import DType, Preset, app, parse_int_list, value
from samout_edge.cli.ui import print_json
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
def plan(
    target: Optional[Path] = typer.Argument(None, help="Export directory (default: --preset)."),
    profile: str = typer.Option(..., "--profile", help="Device profile name, or a FILE.toml."),
    preset: Preset = typer.Option("seed", help="Model size when no DIR is given."),
    dtype: Optional[DType] = typer.Option(None, help="fp16 or fp32 (default: the export's, else the profile's)."),
    batch: int = typer.Option(1, help="Batch size."),
    contexts: Optional[str] = typer.Option(None, help="Context lengths to tabulate (default 1k..1M)."),
    archs: Optional[str] = typer.Option(None, "--archs", help=f"Archs side by side: {ARCH_LIST_HELP} (default: "
                                        "cummax,softmax, and an export's own)."),
    ubatch: int = typer.Option(PREFILL_UBATCH, "--ubatch", min=0,
                               help="Most tokens per prefill call, as generate and serve feed them "
                               "(0: the profile's opt prefill length)."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Memory plan on a device: weights + activations + each arch's state (running max, KV cache, window), and the longest context."""
    from samout_edge.artifact.config import preset as get_preset
    from samout_edge.profiles import load_profile
    from samout_edge.profiles.memory_plan import export_weights, memory_plan

    device = load_profile(profile)
    from samout_edge.artifact.manifest import BENCH_ARCHS

    weights_bytes, weights_kind = None, "fp"
    wanted = [a.strip() for a in archs.split(",") if a.strip()] if archs else list(BENCH_ARCHS)
    if target is not None:
        from samout_edge.artifact.manifest import read_manifest

        manifest = read_manifest(target)
        config, dtype_name = manifest.config, value(dtype) or manifest.dtype
        # the export's weights as stored (int8/int4 with their scales), where they hold for this dtype
        weights_bytes, weights_kind = export_weights(manifest, dtype_name)
        if not archs and manifest.arch not in wanted:
            wanted.append(manifest.arch)
    else:
        config, dtype_name = get_preset(preset.value), value(dtype)
    if batch < 1:
        raise SamoutError(f"--batch must be at least 1, got {batch}")
    result = memory_plan(config, device, dtype_name, batch, parse_int_list(contexts, "--contexts"),
                         weights_bytes=weights_bytes, weights_kind=weights_kind, archs=wanted, ubatch=ubatch or None)
    if json_out:
        print_json(result.to_dict())
        return
    render.memory_plan(result, device, config, batch)
