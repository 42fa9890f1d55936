"""Commands that look: inspect an export or .onnx file, doctor this machine."""

from __future__ import annotations

from pathlib import Path

import typer

from samout_edge.cli import render
from samout_edge.cli.common import app
from samout_edge.cli.ui import print_json


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
