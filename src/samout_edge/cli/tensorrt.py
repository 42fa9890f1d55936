"""`build`: a TensorRT engine for a device profile (or its whole plan, `--dry-run`, without TensorRT)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from samout_edge.cli import render
from samout_edge.cli.common import Precision, app, value
from samout_edge.cli.ui import console, human_bytes, print_json, progress_bar


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
