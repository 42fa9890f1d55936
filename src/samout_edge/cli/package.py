"""`package`: an export or engine as a serving artifact (so far: a Triton Inference Server model repository)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from samout_edge.cli.common import app, choices
from samout_edge.cli.ui import console, human_bytes, print_json
from samout_edge.errors import SamoutError

InstanceKind = choices("InstanceKind", ("gpu", "cpu"))


@app.command()
def package(
    target: Path = typer.Argument(..., help="Export directory (ONNX Runtime backend) or engine directory "
                                  "EXPORT/engines/PROFILE (TensorRT backend)."),
    triton: bool = typer.Option(False, "--triton", help="Write a Triton Inference Server model repository "
                                "(the only format so far)."),
    output: Path = typer.Option(..., "-o", "--output", help="Model repository: new, or an existing one to add the model to."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name (default: the export's directory name, "
                                       "plus the engine profile)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="With an export: package its TensorRT engine built "
                                         "for this profile instead of model.onnx."),
    max_batch_size: Optional[int] = typer.Option(None, "--max-batch-size", min=1, help="Sequences batched into one "
                                                 "execution (default: 8 for ONNX Runtime; the engine's largest batch "
                                                 "every profile takes)."),
    max_sequences: Optional[int] = typer.Option(None, "--max-sequences", min=1, help="Sequences in flight per "
                                                "instance; more wait in a backlog (default: 4 x max batch)."),
    idle_seconds: float = typer.Option(60.0, "--idle-seconds", help="Drop a sequence's state after this long "
                                       "without a request."),
    queue_delay_us: int = typer.Option(0, "--queue-delay-us", min=0, help="How long a step may wait for others "
                                       "to batch with (microseconds)."),
    kind: InstanceKind = typer.Option("gpu", "--kind", help="Where the model instance runs: gpu, or cpu "
                                      "(ONNX Runtime only)."),
    force: bool = typer.Option(False, "--force", help="Write into an OUTPUT that is not a model repository, or "
                               "beside a model directory that is not ours (nothing there is removed)."),
    json_out: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Package an export or engine for serving: `--triton` writes a Triton model directory with implicit state."""
    if not triton:
        raise SamoutError("package needs a format: pass --triton (a Triton Inference Server model repository, "
                          "the only format so far)")
    from samout_edge.triton_server import package_triton

    result = package_triton(target, output, name, engine, max_batch_size, max_sequences, idle_seconds, queue_delay_us,
                            kind.value, force)
    if json_out:
        print_json(result.to_dict())
        return
    console.print(f"{escape(str(result.model_dir))} ({result.platform}, max_batch_size {result.max_batch_size})",
                  highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("file")
    table.add_column("size", justify="right")
    for rel, size in result.files.items():
        table.add_row(escape(rel), human_bytes(size))
    console.print(table)
    check = "parsed as Triton's ModelConfig" if result.validated else \
        "not parsed (pip install 'tritonclient[grpc]' to check it)"
    console.print(f"config.pbtxt {check}", highlight=False)
    for note in result.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    console.print(escape(f"serve: tritonserver --model-repository={result.repository.absolute()} "
                         "(docs/serving.md: the container and the client)"), highlight=False)
